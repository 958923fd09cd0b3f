"""Stand-in for `nixos-rebuild switch --flake REF#HOST` on simulated servers: a real `nix build`.

It builds `REF#nixosConfigurations.HOST.config.system.build.toplevel` with the machine's Nix (offline, no
sandbox: `imaging.OFFLINE_NIX_ARGS`, both Linux systems accepted, the fixture systems being shell scripts)
and points `<root>/run/current-system` at the result, so the system a host runs is the one its flake
builds. A `path:` reference to a directory of the simulated host (a flake source the deployer sent) is
read under `--root`. It records the flake reference in `<root>/var/lib/nix-dabei-sim/rebuilds.log`. Tests
make rebuilds fail by writing a number N into `<root>/var/lib/nix-dabei-sim/fail-rebuilds` (the next N
rebuilds fail), or `always`, and make a switch end in another system than the flake's by writing its store
path into `<root>/var/lib/nix-dabei-sim/switch-to` (what a host whose own settings differ from the
deployer's evaluation does). `--seconds S` makes each rebuild take S seconds more (a build waiting on
downloads), so benchmarks can give the rebuild a realistic share of an installation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..imaging import NIX_FEATURES, OFFLINE_NIX_ARGS

SIM_STATE = "var/lib/nix-dabei-sim"
# Build the systems of either architecture here: the fixture derivations run the host's /bin/sh.
SIM_NIX_ARGS = (*OFFLINE_NIX_ARGS, "--option", "extra-platforms", "aarch64-linux x86_64-linux")


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


def on_host(flake: str, root: Path) -> str:
    """The reference as the simulated host sees it: a `path:/abs` is a directory under its root (a source
    the deployer sent); one not there is read where it is, the simulated hosts sharing this machine's
    files outside their root (a flake given as a path that was not sent, as earlier releases did)."""
    if flake.startswith("path:/"):
        under_root = Path(f"{root}{flake[len('path:') :].split('?', 1)[0]}")
        if under_root.exists():
            return f"path:{root}{flake[len('path:') :]}"
    return flake


def build_toplevel(flake: str, hostname: str) -> str:
    """`nix build` the host's toplevel; its store path. Raises RuntimeError with Nix's error."""
    installable = f"{flake}#nixosConfigurations.{hostname}.config.system.build.toplevel"
    command = ["nix", *NIX_FEATURES, "build", "--no-link", "--json", *SIM_NIX_ARGS, installable]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if "build-users-group" not in line]
        raise RuntimeError(f"nix build {installable} failed: " + "\n".join(lines[-10:]))
    return str(json.loads(done.stdout)[0]["outputs"]["out"])


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
    try:
        system = build_toplevel(on_host(args.flake, args.root), args.hostname)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    switch_to = state / "switch-to"
    if switch_to.is_file():
        system = switch_to.read_text().strip()
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
