"""Stand-in for `nixos-rebuild switch --flake REF#HOST` on simulated servers.

It records the flake reference in `<root>/var/lib/nix-dabei-sim/rebuilds.log` and points
`<root>/run/current-system` at a store path derived from the flake reference. Tests make rebuilds fail by
writing a number N into `<root>/var/lib/nix-dabei-sim/fail-rebuilds` (the next N rebuilds fail), or
`always`. `--seconds S` makes each rebuild take S seconds (sleeping, as a build waits on downloads), so
benchmarks can give the rebuild a realistic share of an installation.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

SIM_STATE = "var/lib/nix-dabei-sim"
_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def store_hash(flake: str) -> str:
    """32 characters of Nix's base32 alphabet from the sha256 of the flake reference (160 bits)."""
    bits = int.from_bytes(hashlib.sha256(flake.encode("utf-8")).digest()[:20], "big")
    return "".join(_NIX_BASE32[(bits >> (5 * i)) & 31] for i in range(31, -1, -1))


def system_path(flake: str, hostname: str) -> str:
    return f"/nix/store/{store_hash(flake)}-nixos-system-{hostname}"


def _take_failure(counter: Path) -> bool:
    """True when a failure is due (and uses it up); the counter file holds the remaining failures."""
    try:
        text = counter.read_text().strip()
    except FileNotFoundError:
        return False
    if text == "always":
        return True
    try:
        remaining = int(text or "0")
    except ValueError:
        raise SystemExit(f"fake-rebuild: {counter} must hold a number of failures or 'always', got {text!r}") from None
    if remaining <= 0:
        return False
    counter.write_text(f"{remaining - 1}\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-rebuild", description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="root of the simulated installed system")
    parser.add_argument("--flake", required=True, help="flake reference (without #hostname)")
    parser.add_argument("--hostname", required=True, help="nixosConfigurations attribute to switch to")
    parser.add_argument("--seconds", type=float, default=0.0, help="how long the rebuild takes (default 0)")
    args = parser.parse_args(argv)
    if not args.root.is_absolute():
        parser.error(f"--root must be an absolute path, got {str(args.root)!r}")
    if not args.flake.strip():
        parser.error("--flake must not be empty")
    if not args.hostname.strip() or "/" in args.hostname:
        parser.error(f"--hostname must be a host name, got {args.hostname!r}")
    if not 0 <= args.seconds <= 3600:
        parser.error(f"--seconds must be between 0 and 3600, got {args.seconds:g}")

    time.sleep(args.seconds)
    state = args.root / SIM_STATE
    state.mkdir(parents=True, exist_ok=True)
    if _take_failure(state / "fail-rebuilds"):
        print(
            f"error: building the system of {args.flake}#{args.hostname} failed (simulated failure)",
            file=sys.stderr,
        )
        return 1

    system = system_path(args.flake, args.hostname)
    current = args.root / "run/current-system"
    current.parent.mkdir(parents=True, exist_ok=True)
    tmp = current.with_name(f".current-system.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(system)
    os.replace(tmp, current)
    with open(state / "rebuilds.log", "a") as f:
        f.write(args.flake + "\n")
    print(f"switched to configuration {system} ({args.flake}#{args.hostname})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
