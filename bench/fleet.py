"""Fleet benchmark: 1, 4 and 16 servers installed through the real dynamic provider server, to convergence.

Each run is a whole `pulumi up` of a fleet, as `python -m dabei_component demo` runs it: the simulator in
its own process (real sshd per server, loop disks, the real first-boot program), the real components under
the local engine, every step in the real provider server (`python -m pulumi.dynamic`) over gRPC, the image
built with the real `nix build`. Runs are interleaved over the sizes (1, 4, 16, 1, 4, ...) after one
warm-up run per size, so that drift on the machine hits every size alike.

    python bench/fleet.py [--sizes 1,4,16] [--runs 5] [--scale 20] [--image-mib 3072] [--uplink-mbit 100] [--json]

The image is bench/write.py's 3 GiB test image (built by `nix build` of a throw-away flake; `--image-mib
0`: the 64 MiB fixture image), and the simulator's uplink model limits what the deployer sends to all
servers together to `--uplink-mbit` (0: unlimited); traffic between servers (the relay) is not limited.
The deployer's bytes are counted by the simulator's uplink proxy (`GET /_sim/uplink`); with
`--uplink-mbit 0` there is no proxy, and no bytes are counted.

Simulator durations: what a Hetzner Cloud server takes (`REAL_SECONDS`) divided by `--scale`. The simulator
boots a server at the end of its reset action, so `reset` is the whole reset-to-SSH time.

Measured per run: wall time of the `up` (registration of the first resource to the last output), CPU
seconds of the provider server and of the simulator, each with all their descendants (getrusage of waited
children; this process is a child subreaper so nothing escapes), the provider server's peak RSS (VmHWM),
and how often the provider compressed and hashed the image: a `zstd` wrapper first on the provider's PATH
counts compressions (hashing happens in the same pass), and every run starts with an empty image cache.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from hcloud import Client

from dabei_component.component import ImageArgs
from dabei_component.demo import demo_args, fixture_image_attr, provider_config, simulator
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.localup import LocalEngine
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer
from dabei_component.sim.client import free_port

MiB = 1024 * 1024
# Rough times of a Hetzner Cloud server (cx22), in seconds: creation a few seconds, the power-on after it,
# rescue boot and reboot tens of seconds, the first-boot `nixos-rebuild switch` of a flake the longest.
REAL_SECONDS = {
    "create": 10.0,  # POST /servers until the create action succeeds
    "boot": 20.0,  # the power-on after creation, until the placeholder OS runs
    "rescue_enable": 2.0,
    "reset": 40.0,  # reset until SSH answers: the rescue system, or the installed NixOS out of rescue
    "reboot": 40.0,
    "rebuild": 180.0,  # first boot: nixos-rebuild switch --flake (fetch and build or substitute)
}
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class RunResult:
    servers: int
    up_seconds: float
    cpu_provider: float  # provider server and its children (nix, zstd)
    cpu_simulator: float  # simulator and its children (sshd, first-boot program, fake rebuild, ssh sessions)
    cpu_engine: float  # this process: the local engine running the Pulumi program
    provider_peak_rss_mb: float
    compressions: int  # zstd compressions started by the provider server
    hosts_written: int  # hosts whose image was written and verified (provider log)
    deployer_bytes: int  # bytes the deployer sent to servers (the simulator's uplink count)
    server_bytes: int  # bytes servers sent to each other (relays)

    @property
    def cpu_total(self) -> float:
        return self.cpu_provider + self.cpu_simulator


def scaled_durations(scale: float) -> dict[str, float]:
    return {name: round(seconds / scale, 4) for name, seconds in REAL_SECONDS.items()}


def become_subreaper() -> None:
    """Orphaned descendants (a daemon's child, a killed namespace) are reparented here and counted."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def zstd_counter(bin_dir: Path, log: Path) -> dict[str, str]:
    """Environment for the provider server with a `zstd` that logs its arguments, then runs the real one."""
    real = shutil.which("zstd")
    if real is None:
        raise SystemExit("zstd is not installed")
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "zstd"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "$DABEI_BENCH_ZSTD_LOG"\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "DABEI_BENCH_ZSTD_LOG": str(log)}


def count_compressions(log: Path) -> int:
    if not log.exists():
        return 0
    calls = [line.split() for line in log.read_text().splitlines()]
    return sum(1 for args in calls if "-d" not in args and "--decompress" not in args)


def run_fleet(
    servers: int,
    work: Path,
    ssh_port: int,
    durations: dict[str, float] | None,
    image: ImageArgs | None = None,
    uplink_bits_per_second: float | None = None,
) -> RunResult:
    """One `up` of a fresh fleet in a fresh simulator; everything it started is stopped before returning.

    `durations` go to the simulator (None: its small defaults); `image` replaces the fixture image."""
    work.mkdir(parents=True)
    zstd_log = work / "zstd-calls.log"
    env = {"XDG_CACHE_HOME": str(work / "cache"), **zstd_counter(work / "bin", zstd_log)}
    reap_orphans()
    cpu_before, engine_before = children_cpu(), self_cpu()
    with simulator(work / "sim", ssh_port) as sim:
        headers = {"Authorization": f"Bearer {sim.token}"}
        control = sim.endpoint.removesuffix("/v1") + "/_sim"
        if durations is not None:
            requests.put(f"{control}/durations", json=durations, headers=headers, timeout=10).raise_for_status()
        uplink_settings = {"bits_per_second": uplink_bits_per_second, "reset_counters": True}
        requests.put(f"{control}/uplink", json=uplink_settings, headers=headers, timeout=10).raise_for_status()
        server = ProviderServer(project="nix-dabei", log_path=work / "provider.log", env=env)
        try:
            server.configure(provider_config(sim))
            engine = LocalEngine(
                server=server, hcloud=Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
            )
            args = demo_args(servers, ssh_port=sim.ssh_port, prefix="bench")
            if image is not None:
                args.image = image
            started = time.monotonic()
            outputs = engine.up(lambda: declare(args))
            up_seconds = time.monotonic() - started
            rss = peak_rss_mb(server.pid)
            uplink = requests.get(f"{control}/uplink", headers=headers, timeout=10).json()["uplink"]
        finally:
            server.close()
        cpu_provider_done = children_cpu()
    reap_orphans()
    cpu_after, engine_after = children_cpu(), self_cpu()
    failed = [name for name, host in outputs["hosts"].items() if not host.get("system")]
    if failed or len(outputs["hosts"]) != servers:
        raise SystemExit(f"{servers} servers: not converged: {failed or outputs['hosts']}")
    log = (work / "provider.log").read_text(errors="replace")
    return RunResult(
        servers=servers,
        up_seconds=up_seconds,
        cpu_provider=cpu_provider_done - cpu_before,
        cpu_simulator=cpu_after - cpu_provider_done,
        cpu_engine=engine_after - engine_before,
        provider_peak_rss_mb=rss,
        compressions=count_compressions(zstd_log),
        hosts_written=len(re.findall(r"install: image verified on disk", log)),
        deployer_bytes=uplink["deployer_bytes"],
        server_bytes=uplink["server_bytes"],
    )


def machine_description() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16", help="fleet sizes, comma-separated (default 1,4,16)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per size after one warm-up (default 5)")
    parser.add_argument("--scale", type=float, default=20.0, help="real durations divided by this (default 20)")
    parser.add_argument(
        "--image-mib", type=int, default=3072, help="size of the generated test image (default 3072; 0: fixture)"
    )
    parser.add_argument(
        "--uplink-mbit", type=float, default=100.0, help="the deployer's uplink in Mbit/s (default 100; 0: unlimited)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dabei-bench-fleet")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of medians and ratios")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated numbers, got {args.sizes!r}")
    if not sizes or any(not 1 <= s <= 50 for s in sizes) or 1 not in sizes:
        parser.error("--sizes must include 1 and lie between 1 and 50")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not args.scale > 0:
        parser.error("--scale must be a positive number")
    if os.geteuid() != 0:
        raise SystemExit("the fleet benchmark needs root: simulated servers use loop devices and namespaces")
    become_subreaper()
    durations = scaled_durations(args.scale)
    ssh_port = free_port()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    load_before = list(os.getloadavg())
    image = generated_image(args.work_dir, args.image_mib) if args.image_mib else None
    results: dict[int, list[RunResult]] = {size: [] for size in sizes}
    compressed = 0
    for round_ in range(args.runs + 1):
        for size in sizes:
            uplink = args.uplink_mbit * 1e6 if args.uplink_mbit > 0 else None
            result = run_fleet(size, args.work_dir / f"run-{round_}-{size}", ssh_port, durations, image, uplink)
            compressed = max(compressed, compressed_image_bytes(args.work_dir / f"run-{round_}-{size}"))
            shutil.rmtree(args.work_dir / f"run-{round_}-{size}", ignore_errors=True)
            label = "warm-up" if round_ == 0 else f"run {round_}"
            print(
                f"{label} {size:>2} servers: up {result.up_seconds:.2f}s, cpu provider {result.cpu_provider:.2f}s"
                f" simulator {result.cpu_simulator:.2f}s, provider peak {result.provider_peak_rss_mb:.0f} MB,"
                f" compressions {result.compressions}, written {result.hosts_written},"
                f" deployer sent {result.deployer_bytes / 1e6:.1f} MB, servers {result.server_bytes / 1e6:.1f} MB",
                file=sys.stderr,
            )
            if round_:
                results[size].append(result)
    summary = summarize(results, durations, args.scale, args.runs)
    summary["image"] = f"generated {args.image_mib} MiB" if args.image_mib else "nix/fixtures/image (64 MiB)"
    summary["uplink_mbit"] = args.uplink_mbit or None
    summary["load_average_before"] = load_before
    summary["load_average_after"] = list(os.getloadavg())
    if image is not None:
        summary["compressed_image_bytes"] = compressed
        if compressed:
            summary["deployer_bytes_over_image"] = {
                str(s): round(statistics.median(r.deployer_bytes for r in results[s]) / compressed, 3) for s in sizes
            }
    print_table(summary)
    if args.json:
        print(json.dumps(summary))


def summarize(
    results: dict[int, list[RunResult]], durations: dict[str, float], scale: float, runs: int
) -> dict[str, Any]:
    def median(size: int, pick: Callable[[RunResult], float]) -> float:
        return statistics.median(pick(r) for r in results[size])

    sizes = sorted(results)
    up = {s: median(s, lambda r: r.up_seconds) for s in sizes}
    cpu = {s: median(s, lambda r: r.cpu_total) for s in sizes}
    largest = sizes[-1]
    summary: dict[str, Any] = {
        "benchmark": "fleet",
        "machine": machine_description(),
        "runs": runs,
        "scale": scale,
        "durations": durations,
        "median_up_seconds": {str(s): round(up[s], 2) for s in sizes},
        "median_cpu_seconds": {
            str(s): {
                "provider": round(median(s, lambda r: r.cpu_provider), 2),
                "simulator": round(median(s, lambda r: r.cpu_simulator), 2),
                "engine": round(median(s, lambda r: r.cpu_engine), 2),
                "total": round(cpu[s], 2),
            }
            for s in sizes
        },
        "provider_peak_rss_mb": {str(s): round(max(r.provider_peak_rss_mb for r in results[s]), 1) for s in sizes},
        "compressions_per_run": {str(s): sorted({r.compressions for r in results[s]}) for s in sizes},
        "hosts_written_per_run": {str(s): sorted({r.hosts_written for r in results[s]}) for s in sizes},
        "up_seconds_min_max": {
            str(s): [round(min(r.up_seconds for r in results[s]), 2), round(max(r.up_seconds for r in results[s]), 2)]
            for s in sizes
        },
        "median_deployer_bytes": {str(s): round(median(s, lambda r: r.deployer_bytes)) for s in sizes},
        "median_server_bytes": {str(s): round(median(s, lambda r: r.server_bytes)) for s in sizes},
    }
    for s in sizes:
        if s != 1:
            summary[f"ratio_{s}_vs_1"] = round(up[s] / up[1], 3)
    if largest > 1:
        summary["cpu_seconds_per_added_server"] = round((cpu[largest] - cpu[1]) / (largest - 1), 3)
        for part in ("provider", "simulator"):
            added = summary["median_cpu_seconds"][str(largest)][part] - summary["median_cpu_seconds"]["1"][part]
            summary[f"{part}_cpu_seconds_per_added_server"] = round(added / (largest - 1), 3)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"{'servers':>7}{'up s':>8}{'ratio':>7}{'cpu prov':>10}{'cpu sim':>9}{'cpu total':>11}{'prov MB':>9}{'zstd':>6}"
    )
    for size, up in summary["median_up_seconds"].items():
        cpu = summary["median_cpu_seconds"][size]
        ratio = summary.get(f"ratio_{size}_vs_1", 1.0)
        print(
            f"{size:>7}{up:>8.2f}{ratio:>7.2f}{cpu['provider']:>10.2f}{cpu['simulator']:>9.2f}{cpu['total']:>11.2f}"
            f"{summary['provider_peak_rss_mb'][size]:>9.0f}{summary['compressions_per_run'][size]!s:>6}"
        )
    for size in summary["median_up_seconds"]:
        low, high = summary["up_seconds_min_max"][size]
        print(
            f"{size:>3} servers: up min {low:.2f} max {high:.2f} s; deployer sent"
            f" {summary['median_deployer_bytes'][size] / 1e6:.1f} MB, servers relayed"
            f" {summary['median_server_bytes'][size] / 1e6:.1f} MB"
        )
    for key in ("cpu_seconds_per_added_server", "compressed_image_bytes", "deployer_bytes_over_image"):
        if key in summary:
            print(f"{key}: {summary[key]}")


# A flake whose image is bench/write.py's deterministic GPT test image, built by the real `nix build`
# (impure: the builder is this Python, so the flake lives only in the work directory).
IMAGE_FLAKE = """{
  outputs = { self }: {
    packages.%(system)s.default = builtins.derivation {
      name = "dabei-bench-image-%(mib)dM";
      system = "%(system)s";
      # Through sh so that Python gets its own path as argv[0] and finds its virtualenv.
      builder = "/bin/sh";
      args = [ "-c" "exec \\"$0\\" \\"$@\\"" "%(python)s" ./build.py "%(mib)d" ];
      PATH = "/usr/sbin:/usr/bin:/sbin:/bin";
    };
  };
}
"""
IMAGE_BUILDER = """import os, sys
from pathlib import Path
sys.path.insert(0, %(bench)r)
from write import make_image
out = Path(os.environ["out"])
out.mkdir()
make_image(out / "nixos.img", int(sys.argv[1]) * 1024 * 1024)
"""


def compressed_image_bytes(run_dir: Path) -> int:
    """Size of the compressed image a run prepared (in its image cache)."""
    sizes = [p.stat().st_size for p in run_dir.glob("cache/**/image.zst")]
    return max(sizes) if sizes else 0


def generated_image(work: Path, mib: int) -> ImageArgs:
    """ImageArgs for a `mib` MiB test image (20% data, half compressible, half random) built by Nix."""
    if mib < 512:
        raise SystemExit("a generated image must be at least 512 MiB (the test layout has a 256 MiB ESP)")
    system = fixture_image_attr().split(".")[1]
    flake = work / f"image-flake-{mib}M"
    flake.mkdir(parents=True, exist_ok=True)
    values = {"system": system, "mib": mib, "python": sys.executable, "bench": str(Path(__file__).parent)}
    (flake / "flake.nix").write_text(IMAGE_FLAKE % values)
    (flake / "build.py").write_text(IMAGE_BUILDER % values)
    return ImageArgs(flake=f"path:{flake}", attr=f"packages.{system}.default", nix_args=list(OFFLINE_NIX_ARGS))


if __name__ == "__main__":
    main()
