"""The main job: the whole flow for a few servers on this machine, with no Hetzner account.

Starts the local Hetzner Cloud simulator, builds the fixture image with the real `nix build`, and runs the
real components through the real dynamic provider server (see localup.py) until every host converged.
Progress goes to stderr; stdout gets one JSON line per host and a final summary line.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcloud import Client

from .component import Deadlines, FleetArgs, HostArgs, ImageArgs
from .imaging import OFFLINE_NIX_ARGS
from .localup import LocalEngine, Plan
from .program import declare
from .provider_server import ProviderServer
from .sim.client import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_FLAKE = PROJECT_ROOT / "nix" / "fixtures" / "image"
DEMO_FLAKE = "github:example/infra"


@dataclass
class SimHandle:
    endpoint: str
    token: str
    control_url: str
    ssh_port: int
    process: subprocess.Popen[bytes]


@contextmanager
def simulator(state_dir: Path, ssh_port: int) -> Iterator[SimHandle]:
    """The simulator as its own process, stopped (and cleaned up) with SIGTERM."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dabei_component.sim",
            "serve",
            "--state-dir",
            str(state_dir),
            "--ssh-port",
            str(ssh_port),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"the simulator exited with status {proc.wait()} before it was ready")
        info = json.loads(line)
        yield SimHandle(info["endpoint"], info["token"], info["control"], int(info["ssh_port"]), proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def fixture_image_attr() -> str:
    arch = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux", "arm64": "aarch64-linux"}[platform.machine()]
    return f"packages.{arch}.default"


def demo_args(servers: int, flake: str = DEMO_FLAKE, ssh_port: int = 22, prefix: str = "demo") -> FleetArgs:
    return FleetArgs(
        hosts=[
            HostArgs(
                name=f"{prefix}-{i}",
                server_type="cx22",
                location=("fsn1", "nbg1", "hel1")[i % 3],
                flake=flake,
                labels={"purpose": "demo"},
            )
            for i in range(1, servers + 1)
        ],
        image=ImageArgs(flake=f"path:{FIXTURE_FLAKE}", attr=fixture_image_attr(), nix_args=list(OFFLINE_NIX_ARGS)),
        deadlines=Deadlines(rescue=300, install=600, firstboot=600),
        ssh_port=ssh_port,
    )


def provider_config(sim: SimHandle) -> dict[str, str]:
    return {"hcloud:token": sim.token, "hcloud:endpoint": sim.endpoint, "nix-dabei:sshPort": str(sim.ssh_port)}


def preview_demo(servers: int, ssh_port: int, work_dir: Path) -> Plan:
    """The plan `up` would carry out for `servers` new simulated servers; nothing is created."""
    with simulator(work_dir / "sim", ssh_port) as sim:
        server = ProviderServer(
            project="nix-dabei",
            log_path=work_dir / "provider.log",
            env={"XDG_CACHE_HOME": str(work_dir / "cache")},
            echo=sys.stderr,
        )
        try:
            server.configure(provider_config(sim))
            engine = LocalEngine(
                server=server, hcloud=Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
            )
            return engine.preview(lambda: declare(demo_args(servers, ssh_port=sim.ssh_port)))
        finally:
            server.close()


def run_demo(servers: int, ssh_port: int, work_dir: Path, echo: bool = True) -> list[dict[str, Any]]:
    """Install `servers` simulated servers; one record per host with its status and outputs."""
    with simulator(work_dir / "sim", ssh_port) as sim:
        server = ProviderServer(
            project="nix-dabei",
            log_path=work_dir / "provider.log",
            env={"XDG_CACHE_HOME": str(work_dir / "cache")},
            echo=sys.stderr if echo else None,
        )
        try:
            server.configure(provider_config(sim))
            engine = LocalEngine(
                server=server, hcloud=Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
            )
            outputs = engine.up(lambda: declare(demo_args(servers, ssh_port=sim.ssh_port)))
        finally:
            server.close()
    return [
        {"name": name, "status": "converged" if host.get("system") else "failed", **host}
        for name, host in sorted(outputs["hosts"].items())
    ]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dabei_component demo", description=__doc__)
    parser.add_argument("--servers", type=int, default=3, help="how many servers to install (default 3)")
    parser.add_argument(
        "--ssh-port", type=int, default=0, help="SSH port of the simulated servers (default: a free port)"
    )
    parser.add_argument("--work-dir", type=Path, help="keep state, logs and caches here (default: a temp dir)")
    parser.add_argument(
        "--preview", action="store_true", help="only show the plan `pulumi preview` would show; create nothing"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.servers <= 50:
        parser.error("--servers must be between 1 and 50")
    if os.geteuid() != 0:
        print("the demo needs root: the simulated servers use loop devices and namespaces", file=sys.stderr)
        return 2
    if args.ssh_port == 0:
        # Not 22: a system sshd listening on all addresses would hold it on every loopback address too.
        args.ssh_port = free_port()
    with tempfile.TemporaryDirectory(prefix="nix-dabei-demo-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.preview:
            print(preview_demo(args.servers, args.ssh_port, work).render(), flush=True)
            return 0
        started = time.monotonic()
        hosts = run_demo(args.servers, args.ssh_port, work)
        elapsed = round(time.monotonic() - started, 1)
    for host in hosts:
        print(json.dumps(host, sort_keys=True), flush=True)
    ok = all(h["status"] == "converged" for h in hosts)
    summary = {
        "hosts": [{"name": h["name"], "status": h["status"]} for h in hosts],
        "converged": sum(h["status"] == "converged" for h in hosts),
        "total": len(hosts),
        "elapsed_seconds": elapsed,
    }
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1
