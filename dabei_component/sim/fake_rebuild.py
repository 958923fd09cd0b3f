"""Stand-in for `nixos-rebuild switch --flake REF#HOST` on simulated servers, with generations.

A switch records the flake reference in `<root>/var/lib/nix-dabei-sim/rebuilds.log`, "builds" a store path
derived from the flake reference (`<root>/nix/store/<hash>-nixos-system-<host>/behaviour.json`), adds it as
the next generation of the system profile (`<root>/nix/var/nix/profiles/system -> system-<N>-link ->
/nix/store/...`, as `nix-env --set` does), then activates it: `<root>/run/current-system` points at it.
Tests make rebuilds fail by writing a number N into `<root>/var/lib/nix-dabei-sim/fail-rebuilds` (the next
N rebuilds fail), or `always`. `--seconds S` makes each rebuild take S seconds (sleeping, as a build waits
on downloads), so benchmarks can give the rebuild a realistic share of an installation.

What a configuration does once active comes from `--behaviours FILE` (the simulator's `/_sim/flakes`):
`{"<flake ref>": {"ssh": "ok" | "refused", "health": "ok" | "failing", "session": "kept" | "cut"}}`
(`session: cut`: switching to it cuts every open SSH connection, as a switch that restarts the network
does; the machine model kills sshd's session processes and the switch waits for that). Activation writes it to
`<root>/run/nix-dabei-sim/system.json`; the machine model applies `ssh` to its sshd (root refused at login,
open sessions kept) and acknowledges in `<root>/run/nix-dabei-sim/sshd-state`, which activation waits for,
as a switch waits for sshd's restart. `app-health` on the host and its HTTP endpoint answer by `health`.

`fake_rebuild switch-generation --root R N` and `fake_rebuild activate --root R SYSTEM` stand in for
`nix-env --profile /nix/var/nix/profiles/system --switch-generation N` and
`SYSTEM/bin/switch-to-configuration switch` (the commands a rollback runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

SIM_STATE = "var/lib/nix-dabei-sim"
# What the active configuration does (written by activation, read by the machine model and `app-health`).
ACTIVE_SYSTEM = "run/nix-dabei-sim/system.json"
# The sshd state the machine model has applied ("ok" or "refused"; absent: "ok").
SSHD_STATE = "run/nix-dabei-sim/sshd-state"
# A switch asks the machine model to cut every SSH connection; the model removes the file once done.
CUT_SESSIONS = "run/nix-dabei-sim/cut-sessions"
PROFILE = "nix/var/nix/profiles/system"
BEHAVIOURS = ("ssh", "health", "session")
_SSHD_WAIT_SECONDS = 20.0
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


def read_behaviours(path: Path | None) -> dict[str, dict[str, str]]:
    """The simulator's table of what each flake's configuration does; a missing file is an empty table."""
    if path is None:
        return {}
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return table if isinstance(table, dict) else {}


def behaviour_of(table: dict[str, dict[str, str]], flake: str) -> dict[str, str]:
    entry = table.get(flake) or {}
    return {"ssh": entry.get("ssh", "ok"), "health": entry.get("health", "ok"), "session": entry.get("session", "kept")}


def _replace_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def generations(root: Path) -> dict[int, str]:
    """{number: store path} of the system profile's generations."""
    found = {}
    for link in (root / PROFILE).parent.glob("system-*-link"):
        match = re.fullmatch(r"system-(\d+)-link", link.name)
        if match:
            found[int(match[1])] = os.readlink(link)
    return found


def add_generation(root: Path, system: str) -> int:
    """A new generation for `system`, made current (what `nix-env --profile ... --set` does)."""
    profile = root / PROFILE
    profile.parent.mkdir(parents=True, exist_ok=True)
    number = max(generations(root), default=0) + 1
    _replace_link(profile.parent / f"system-{number}-link", system)
    _replace_link(profile, f"system-{number}-link")
    return number


def switch_generation(root: Path, number: int) -> None:
    if number not in generations(root):
        raise SystemExit(f"error: generation {number} does not exist")
    _replace_link(root / PROFILE, f"system-{number}-link")


def activate(root: Path, system: str) -> None:
    """Point run/current-system at `system` and make its behaviour effective, waiting for sshd to follow."""
    try:
        behaviour = json.loads((root / system.lstrip("/") / "behaviour.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"error: {system} is not a system built on this host") from None
    current = root / "run/current-system"
    current.parent.mkdir(parents=True, exist_ok=True)
    _replace_link(current, system)
    active = root / ACTIVE_SYSTEM
    active.parent.mkdir(parents=True, exist_ok=True)
    tmp = active.with_name(f".{active.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"system": system, **behaviour}) + "\n")
    os.replace(tmp, active)
    give_up = time.monotonic() + _SSHD_WAIT_SECONDS
    while _sshd_state(root) != behaviour["ssh"]:
        if time.monotonic() > give_up:
            raise SystemExit(f"error: sshd did not take the configuration ({behaviour['ssh']}) within 20 s")
        time.sleep(0.05)


def _cut_sessions(root: Path) -> None:
    request = root / CUT_SESSIONS
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text("cut\n")
    give_up = time.monotonic() + _SSHD_WAIT_SECONDS
    while request.exists():
        if time.monotonic() > give_up:
            raise SystemExit("error: the SSH connections were not cut within 20 s")
        time.sleep(0.05)


def _sshd_state(root: Path) -> str:
    try:
        return (root / SSHD_STATE).read_text().strip() or "ok"
    except FileNotFoundError:
        return "ok"


def _switch(args: argparse.Namespace) -> int:
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
    built = args.root / system.lstrip("/")
    built.mkdir(parents=True, exist_ok=True)
    behaviour: dict[str, Any] = behaviour_of(read_behaviours(args.behaviours), args.flake)
    (built / "behaviour.json").write_text(json.dumps({**behaviour, "flake": args.flake}) + "\n")
    number = add_generation(args.root, system)
    with open(state / "rebuilds.log", "a") as f:
        f.write(args.flake + "\n")
    activate(args.root, system)
    if behaviour["session"] == "cut":
        _cut_sessions(args.root)
    print(f"switched to configuration {system} ({args.flake}#{args.hostname}), generation {number}")
    return 0


def _root(parser: argparse.ArgumentParser, root: Path) -> Path:
    if not root.is_absolute():
        parser.error(f"--root must be an absolute path, got {str(root)!r}")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "health":
        sub = argparse.ArgumentParser(prog="app-health", description="the simulated application's health")
        sub.add_argument("--root", required=True, type=Path, help="root of the simulated installed system")
        args = sub.parse_args(argv[1:])
        try:
            active = json.loads((_root(sub, args.root) / ACTIVE_SYSTEM).read_text())
        except (OSError, ValueError):
            active = {}
        if active.get("health", "ok") != "ok":
            print(f"app: unhealthy on {active.get('system')} (simulated)", file=sys.stderr)
            return 1
        print("app: healthy")
        return 0
    if argv and argv[0] in ("switch-generation", "activate"):
        sub = argparse.ArgumentParser(prog=f"fake-rebuild {argv[0]}")
        sub.add_argument("--root", required=True, type=Path, help="root of the simulated installed system")
        if argv[0] == "switch-generation":
            sub.add_argument("generation", type=int, help="the generation to make current")
            args = sub.parse_args(argv[1:])
            switch_generation(_root(sub, args.root), args.generation)
            return 0
        sub.add_argument("system", help="the store path of the system to activate")
        args = sub.parse_args(argv[1:])
        activate(_root(sub, args.root), args.system)
        print(f"activated {args.system}")
        return 0
    parser = argparse.ArgumentParser(prog="fake-rebuild", description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="root of the simulated installed system")
    parser.add_argument("--flake", required=True, help="flake reference (without #hostname)")
    parser.add_argument("--hostname", required=True, help="nixosConfigurations attribute to switch to")
    parser.add_argument("--seconds", type=float, default=0.0, help="how long the rebuild takes (default 0)")
    parser.add_argument("--behaviours", type=Path, help="JSON table of what each flake's configuration does")
    args = parser.parse_args(argv)
    _root(parser, args.root)
    if not args.flake.strip():
        parser.error("--flake must not be empty")
    if not args.hostname.strip() or "/" in args.hostname:
        parser.error(f"--hostname must be a host name, got {args.hostname!r}")
    if not 0 <= args.seconds <= 3600:
        parser.error(f"--seconds must be between 0 and 3600, got {args.seconds:g}")
    return _switch(args)


if __name__ == "__main__":
    sys.exit(main())
