"""What the preview costs on the deployer: one `nix eval` for the fleet's systems against one per host.

Builds a hosts' flake (the fixture flake with N hosts) in a temporary directory, locks it once, then times,
interleaved, `flakes.evaluate_systems` over all hosts in one process and the same evaluation run host by
host (a process each), and prints medians and their ratio. Both are checked to give the same store paths.

    venv/bin/python bench/evaluate.py --json            # 20 hosts, 5 runs each
    venv/bin/python bench/evaluate.py --hosts 50 --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dabei_component.demo import write_fixture_flake
from dabei_component.flakes import evaluate_systems, lock
from dabei_component.imaging import OFFLINE_NIX_ARGS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dabei-bench-eval-") as tmp:
        names = [f"web-{i}" for i in range(1, a.hosts + 1)]
        flake = write_fixture_flake(Path(tmp) / "infra", dict.fromkeys(names, "x86_64-linux"))
        locked = lock(str(flake), tmp, OFFLINE_NIX_ARGS)
        hosts = dict.fromkeys(names, locked)
        fleet_times, per_host_times = [], []
        for _ in range(a.runs):
            start = time.monotonic()
            together = evaluate_systems(hosts, tmp, OFFLINE_NIX_ARGS)
            fleet_times.append(time.monotonic() - start)
            start = time.monotonic()
            alone = {}
            for name in names:
                alone.update(evaluate_systems({name: locked}, tmp, OFFLINE_NIX_ARGS))
            per_host_times.append(time.monotonic() - start)
            assert together == alone
    result = {
        "hosts": a.hosts,
        "runs": a.runs,
        "one_eval_median_s": round(statistics.median(fleet_times), 3),
        "eval_per_host_median_s": round(statistics.median(per_host_times), 3),
        "ratio_one_eval_vs_per_host": round(statistics.median(fleet_times) / statistics.median(per_host_times), 3),
    }
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
