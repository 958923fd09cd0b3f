"""Stand-in for `nixos-rebuild switch --flake REF#HOST` on simulated servers: a real `nix build`, with
generations.

A switch builds `REF#nixosConfigurations.HOST.config.system.build.toplevel` with this machine's Nix into the
simulated host's own store (`<root>/nix/store`, a chroot store: Nix builds there in its sandbox, given the
system directories the fixture systems' shell scripts need), offline and with no access to the deployer's
store or credentials: an input the deployer did not send and the host cannot fetch fails the build, as on
a host without it. So the system a host runs is the one its flake builds. A `path:` reference to a directory of the
simulated host (a flake source the deployer sent) is read under `--root`. The switch records the flake
reference in `<root>/var/lib/nix-dabei-sim/rebuilds.log`, notes what the built system does in
`<root>/<store path>/behaviour.json`, adds the store path as the next generation of the system profile
(`<root>/nix/var/nix/profiles/system -> system-<N>-link -> /nix/store/...`, as `nix-env --set` does), then
activates it: `<root>/run/current-system` points at it. Tests make rebuilds fail by writing a number N into
`<root>/var/lib/nix-dabei-sim/fail-rebuilds` (the next N rebuilds fail), or `always`, and make a switch end
in another system than the flake's by writing its store path into `<root>/var/lib/nix-dabei-sim/switch-to`
(what a host whose own settings differ from the deployer's evaluation does). `--seconds S` makes each
rebuild take S seconds more (a build waiting on downloads), so benchmarks can give the rebuild a realistic
share of an installation.

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
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..imaging import NIX_FEATURES, OFFLINE_NIX_ARGS

SIM_STATE = "var/lib/nix-dabei-sim"
# Build the systems of either architecture here: the fixture derivations run the host's /bin/sh.
SIM_NIX_ARGS = (*OFFLINE_NIX_ARGS, "--option", "extra-platforms", "aarch64-linux x86_64-linux")
# What the active configuration does (written by activation, read by the machine model and `app-health`).
ACTIVE_SYSTEM = "run/nix-dabei-sim/system.json"
# The sshd state the machine model has applied ("ok" or "refused"; absent: "ok").
SSHD_STATE = "run/nix-dabei-sim/sshd-state"
# A switch asks the machine model to cut every SSH connection; the model removes the file once done.
CUT_SESSIONS = "run/nix-dabei-sim/cut-sessions"
PROFILE = "nix/var/nix/profiles/system"
BEHAVIOURS = ("ssh", "health", "session")
_SSHD_WAIT_SECONDS = 20.0


def on_host(flake: str, root: Path) -> str:
    """The reference as the simulated host sees it: a `path:/abs` is a directory under its root (a source
    the deployer sent); one not there is read where it is, the simulated hosts sharing this machine's
    files outside their root (a flake given as a path that was not sent, as earlier releases did)."""
    if flake.startswith("path:/"):
        under_root = Path(f"{root}{flake[len('path:') :].split('?', 1)[0]}")
        if under_root.exists():
            return f"path:{root}{flake[len('path:') :]}"
    return flake


def host_store_args(root: Path) -> list[str]:
    """Nix options for the simulated host's own store under `root`."""
    return ["--store", str(root)]


# What a chroot store's sandbox needs of this machine for the fixture systems (/bin/sh and its libraries).
_SANDBOX_PATHS = " ".join(p for p in ("/bin", "/lib", "/lib64", "/usr") if Path(p).exists())
# The simulated host has no way out: every download goes to a closed port on loopback (no DNS lookups).
_NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "all_proxy")}


def build_toplevel(flake: str, hostname: str, root: Path) -> str:
    """`nix build` the host's toplevel into its store under `root`; the store path. Raises RuntimeError
    with Nix's error."""
    installable = f"{flake}#nixosConfigurations.{hostname}.config.system.build.toplevel"
    # Nix's build sandbox needs a /proc of its own PID namespace with nothing mounted over it (the machine's
    # namespace binds its boot_id into /proc).
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
    command += ["nix", *NIX_FEATURES, "build", "--no-link", "--json", *SIM_NIX_ARGS, *host_store_args(root)]
    command += ["--option", "extra-sandbox-paths", _SANDBOX_PATHS, installable]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "root"), **_NO_NETWORK}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if "build-users-group" not in line]
        raise RuntimeError(f"nix build {installable} failed: " + "\n".join(lines[-10:]))
    return str(json.loads(done.stdout)[0]["outputs"]["out"])


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

    try:
        system = build_toplevel(on_host(args.flake, args.root), args.hostname, args.root)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    switch_to = state / "switch-to"
    if switch_to.is_file():
        system = switch_to.read_text().strip()
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
