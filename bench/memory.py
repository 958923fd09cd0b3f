"""Memory benchmark: peak RSS of the provider server process, by image size and by fleet size.

Every case is a whole `pulumi up` through the real provider server in the simulator (see fleet.py): the
Image step builds the image with `nix build` and compresses and hashes it, the Install step streams it to
each server and verifies it, the first boot converges. The figure is the provider server process's VmHWM
(peak resident set) at the end of the `up`; its children (nix, zstd) are separate processes and not in it.

    python bench/memory.py [--runs 5] [--json]

Cases: one server with a 0.5 GiB and with a 3 GiB image (bench/write.py's deterministic test image: does
memory grow with the image?), and 16 servers with the fixture image and with the 0.5 GiB image (16 streams
at once). Simulator durations are its small defaults: they do not change what is held in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet import become_subreaper, free_port, generated_image, machine_description, run_fleet

# (name, servers, generated image MiB or 0 for the fixture image)
CASES = [
    ("1 server, 0.5 GiB image", 1, 512),
    ("1 server, 3 GiB image", 1, 3072),
    ("16 servers, fixture image", 16, 0),
    ("16 servers, 0.5 GiB image", 16, 512),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case after one warm-up (default 5)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dabei-bench-memory")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("the memory benchmark needs root: simulated servers use loop devices and namespaces")
    become_subreaper()
    ssh_port = free_port()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    peaks: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    for round_ in range(args.runs + 1):
        for index, (name, servers, mib) in enumerate(CASES):
            image = generated_image(args.work_dir, mib) if mib else None
            run_dir = args.work_dir / f"run-{round_}-{index}"
            result = run_fleet(servers, run_dir, ssh_port, None, image)
            shutil.rmtree(run_dir, ignore_errors=True)
            label = "warm-up" if round_ == 0 else f"run {round_}"
            print(
                f"{label} {name}: provider peak {result.provider_peak_rss_mb:.1f} MB, up {result.up_seconds:.1f}s,"
                f" compressions {result.compressions}, written {result.hosts_written}",
                file=sys.stderr,
            )
            if round_:
                peaks[name].append(result.provider_peak_rss_mb)
                seconds[name].append(result.up_seconds)
    summary: dict[str, Any] = {
        "benchmark": "memory",
        "machine": machine_description(),
        "runs": args.runs,
        "provider_peak_rss_mb": {name: round(max(values), 1) for name, values in peaks.items()},
        "provider_peak_rss_mb_median": {name: round(statistics.median(values), 1) for name, values in peaks.items()},
        "median_up_seconds": {name: round(statistics.median(values), 2) for name, values in seconds.items()},
    }
    small, large = (summary["provider_peak_rss_mb"][name] for name, _, _ in CASES[:2])
    summary["growth_mb_0_5_to_3_gib"] = round(large - small, 1)
    print(f"{'case':<30}{'peak MB (max)':>15}{'median':>9}{'up s':>8}")
    for name, _, _ in CASES:
        print(
            f"{name:<30}{summary['provider_peak_rss_mb'][name]:>15.1f}"
            f"{summary['provider_peak_rss_mb_median'][name]:>9.1f}{summary['median_up_seconds'][name]:>8.1f}"
        )
    print(f"growth from 0.5 GiB to 3 GiB: {summary['growth_mb_0_5_to_3_gib']} MB")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
