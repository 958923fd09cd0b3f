"""Record a stack with an earlier release of the component: run as a separate process whose PYTHONPATH
puts that release's `dabei_component` and `dabei_firstboot` first (see test_upgrade.py).

It uses only what every release has had since the first (`localup.LocalEngine`, `program.declare`, the
argument dataclasses), installs the hosts against the simulator given on the command line, and writes the
engine's state as JSON: `{key: {"id", "inputs", "outputs"}}`, `__provider` pickles included, exactly as that
release recorded them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hcloud import Client

import dabei_component
from dabei_component.component import Deadlines, FleetArgs, HostArgs, ImageArgs
from dabei_component.localup import LocalEngine
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("endpoint", "token", "ssh-port", "flake", "attr", "work-dir", "out", "fleet"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--host", action="append", required=True, help="name:location")
    p.add_argument("--nix-arg", action="append", default=[])
    a = p.parse_args()
    print(f"recording with the release at {Path(dabei_component.__file__).parent}", file=sys.stderr)
    work = Path(a.work_dir)
    args = FleetArgs(
        hosts=[
            HostArgs(name=h.split(":")[0], server_type="cx22", location=h.split(":")[1], flake="github:example/infra")
            for h in a.host
        ],
        image=ImageArgs(flake=a.flake, attr=a.attr, nix_args=a.nix_arg),
        deadlines=Deadlines(rescue=300, install=600, firstboot=600),
        ssh_port=int(a.ssh_port),
    )
    server = ProviderServer(
        project="nix-dabei", log_path=work / "release-provider.log", env={"XDG_CACHE_HOME": str(work / "cache")}
    )
    try:
        server.configure({"hcloud:token": a.token, "hcloud:endpoint": a.endpoint, "nix-dabei:sshPort": a.ssh_port})
        engine = LocalEngine(server=server, hcloud=Client(token=a.token, api_endpoint=a.endpoint, poll_interval=0.2))
        engine.up(lambda: declare(args, name=a.fleet))
    finally:
        server.close()
    state = {k: {"id": r.id, "inputs": r.inputs, "outputs": r.outputs} for k, r in engine.state.items()}
    Path(a.out).write_text(json.dumps(state, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
