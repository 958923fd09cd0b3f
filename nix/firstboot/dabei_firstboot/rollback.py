"""Confirmed switches: an in-place switch the deployer must confirm in time, or the host rolls itself back.

`nix-dabei apply --confirm-seconds N` records the generation the host runs (`confirm.json`), starts a
watchdog that lives outside the SSH session, then switches. Once the switch is done the deployer has N
seconds to reconnect (a new SSH connection with the pinned key proves that sshd and the network still
work), run its health checks and call `nix-dabei confirm`. Without that confirmation the watchdog rolls
back: the system profile is pointed at the recorded generation again and that generation's own
switch-to-configuration activates it and makes it the boot loader's default, as
`nixos-rebuild switch --rollback` does (nixpkgs pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/nix.py:
rollback() runs `nix-env --rollback -p <profile>`, then `<profile>/bin/switch-to-configuration switch`).
The generation is named by number (`--switch-generation`), not "one back": a switch that failed before
creating a generation must not roll back past the one the host ran.

On NixOS the watchdog runs as a transient systemd unit (`systemd-run`, set by nix/modules/firstboot.nix):
it survives the end of the SSH session and the deployer's death, and switch-to-configuration, which acts
on the units whose files are in /etc/systemd/system of the old or new system, leaves a transient unit
alone. A reboot ends the watchdog, and the boot default is then the new generation (the switch made it
so): the module starts `nix-dabei watchdog` again at boot while a record waits, and it rolls back when due.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from .config import CONFIRM_RECORD, CURRENT_SYSTEM, FLAKE_FILE, PENDING_MARKER, SYSTEM_PROFILE, Config
from .lock import BusyError, run_lock
from .rebuild import wait_for_previous_switch
from .status import now, patch_status, write_atomic, write_json

# What this program offers the deployer (`nix-dabei status` lists it; a host installed by an older release
# lists nothing, and the deployer then applies without a confirmation window).
FEATURES = ("confirm",)
# States of a confirmation record.
SWITCHING = "switching"  # the switch runs
AWAITING = "awaiting-confirmation"  # switched; `confirm_by` is set
CONFIRMED = "confirmed"
ROLLED_BACK = "rolled-back"
ROLLBACK_FAILED = "rollback-failed"
NOT_SWITCHED = "not-switched"  # the rebuild failed and left the running system as it was
_WATCH_SECONDS = 0.5
# The watchdog waits this long for a running confirmation or switch to let go of the lock.
_LOCK_WAIT_SECONDS = 30.0

Log = Callable[[str], None]


class RollbackError(Exception):
    """Rolling back failed; the text names the command and its output."""


def current_generation(config: Config) -> tuple[int | None, str | None]:
    """(number, store path) of the system profile's current generation, or (None, None) without a profile."""
    profile = config.path(SYSTEM_PROFILE)
    try:
        link = os.readlink(profile)
    except OSError:
        return None, None
    match = re.fullmatch(r"system-(\d+)-link", os.path.basename(link))
    if match is None:
        return None, None
    try:
        system = os.readlink(profile.parent / os.path.basename(link))
    except OSError:
        system = None
    return int(match[1]), system


def running_system(config: Config) -> str | None:
    try:
        return os.readlink(config.path(CURRENT_SYSTEM))
    except OSError:
        return None


def read_record(config: Config) -> dict[str, Any] | None:
    try:
        value = json.loads(config.path(CONFIRM_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_record(config: Config, record: dict[str, Any]) -> None:
    write_json(config.path(CONFIRM_RECORD), record)


def _read_flake(config: Config) -> str | None:
    try:
        return config.path(FLAKE_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def arm(config: Config, log: Log, window_seconds: float, flake: str) -> dict[str, Any]:
    """Record what runs now and start the watchdog; call with the run lock held, before switching."""
    generation, profile_system = current_generation(config)
    record: dict[str, Any] = {
        "token": secrets.token_hex(8),
        "state": SWITCHING,
        "window_seconds": window_seconds,
        "armed_at": now(),
        "confirm_by": None,
        "flake": flake,
        "previous": {
            "generation": generation,
            "system": running_system(config) or profile_system,
            "profile_system": profile_system,
            "flake": _read_flake(config),
        },
        "new": None,
        "reason": None,
        "finished_at": None,
    }
    _write_record(config, record)
    start_watchdog(config, record["token"], log)
    log(
        f"switch {record['token']} armed: without confirmation within {window_seconds:g}s of the switch the host "
        f"returns to generation {generation} ({record['previous']['system']})"
    )
    return record


def start_watchdog(config: Config, token: str, log: Log) -> None:
    """`watchdog_command` (a transient systemd unit on NixOS), else a detached process in its own session."""
    if config.watchdog_command is not None:
        argv = [a.replace("{token}", token) for a in config.watchdog_command]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RollbackError(
                f"starting the watchdog failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-300:]}"
            )
        return
    argv = [sys.executable, "-m", "dabei_firstboot"]
    if config.source != "(defaults)":
        argv += ["--config", config.source]
    subprocess.Popen(
        [*argv, "watchdog", "--token", token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def after_switch(config: Config, log: Log, record: dict[str, Any], converged: bool, error: str | None) -> None:
    """Called by `apply` with the lock held once the rebuild ended: open the window, or undo a failed switch."""
    generation, _ = current_generation(config)
    record["new"] = {"generation": generation, "system": running_system(config), "flake": record["flake"]}
    if converged:
        record["state"] = AWAITING
        record["confirm_by"] = time.time() + float(record["window_seconds"])
        record["confirm_by_text"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["confirm_by"]))
        _write_record(config, record)
        log(f"switch {record['token']} done; waiting for confirmation until {record['confirm_by_text']}")
        return
    if not _changed(config, record):
        record["state"] = NOT_SWITCHED
        record["reason"] = error
        record["finished_at"] = now()
        _write_record(config, record)
        return
    rollback_locked(config, log, record, f"the switch failed: {error}")


def _changed(config: Config, record: dict[str, Any]) -> bool:
    previous = record["previous"]
    generation, _ = current_generation(config)
    return generation != previous["generation"] or running_system(config) != previous["system"]


def _run(argv: list[str], log: Log, timeout: float) -> None:
    log(f"rollback: {' '.join(argv)}")
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RollbackError(f"{' '.join(argv)}: {exc}") from None
    for line in (done.stdout + done.stderr).splitlines():
        log(f"rollback| {line}")
    # switch-to-configuration exits 4 when it switched but some units failed: the old system runs.
    if done.returncode not in (0, 4):
        output = (done.stdout + done.stderr).strip()[-500:]
        raise RollbackError(f"{' '.join(argv)} failed (exit {done.returncode}): {output}")


def rollback_locked(config: Config, log: Log, record: dict[str, Any], reason: str) -> dict[str, Any]:
    """Return to the recorded generation (call with the run lock held); the record says how it went."""
    previous = record["previous"]
    from_system = running_system(config)
    log(f"rolling back switch {record['token']}: {reason}")
    try:
        if previous["generation"] is None or previous["system"] is None:
            raise RollbackError("the host had no system profile generation before the switch: nothing to return to")
        generation, _ = current_generation(config)
        if generation != previous["generation"]:
            gen = str(previous["generation"])
            _run([a.replace("{generation}", gen) for a in config.switch_generation_command], log, 600)
        system = previous["profile_system"] or previous["system"]
        _run([a.replace("{system}", system) for a in config.activate_command], log, config.rebuild_timeout_seconds)
    except RollbackError as exc:
        record.update(state=ROLLBACK_FAILED, reason=f"{reason}; rolling back failed: {exc}", finished_at=now())
        _write_record(config, record)
        patch_status(config, phase="failed", last_error=record["reason"])
        log(record["reason"])
        return record
    if previous["flake"] is not None:
        write_atomic(config.path(FLAKE_FILE), (previous["flake"] + "\n").encode())
    config.path(PENDING_MARKER).unlink(missing_ok=True)
    to_system = running_system(config)
    record.update(
        state=ROLLED_BACK,
        reason=reason,
        finished_at=now(),
        rolled_back={"from_system": from_system, "to_system": to_system, "to_generation": previous["generation"]},
    )
    _write_record(config, record)
    patch_status(
        config,
        phase="converged",
        system=to_system,
        flake=previous["flake"],
        failed_units=[],
        last_error=None,
        rolled_back={"at": record["finished_at"], "reason": reason, "from": from_system, "token": record["token"]},
    )
    log(f"rolled back to generation {previous['generation']} ({to_system})")
    return record


def cmd_confirm(config: Config, log: Log, token: str) -> int:
    """Confirm a switch; exit 0 only when it was waiting for this confirmation (or already confirmed)."""
    try:
        with run_lock(config, _LOCK_WAIT_SECONDS):
            record = read_record(config)
            if record is None or record.get("token") != token:
                return _answer(record, 1, f"no switch {token} to confirm")
            if record["state"] == AWAITING:
                record.update(state=CONFIRMED, finished_at=now())
                _write_record(config, record)
                log(f"switch {token} confirmed")
            return _answer(record, 0 if record["state"] == CONFIRMED else 1)
    except BusyError as exc:
        return _answer(None, 1, str(exc))


def cmd_rollback(config: Config, log: Log, token: str, reason: str) -> int:
    """Roll back a switch that waits for confirmation; exit 0 when the host runs the recorded generation."""
    try:
        with run_lock(config, _LOCK_WAIT_SECONDS):
            record = read_record(config)
            if record is None or record.get("token") != token:
                return _answer(record, 1, f"no switch {token} to roll back")
            if record["state"] == AWAITING:
                record = rollback_locked(config, log, record, reason)
            return _answer(record, 0 if record["state"] == ROLLED_BACK else 1)
    except BusyError as exc:
        return _answer(None, 1, str(exc))


def _answer(record: dict[str, Any] | None, code: int, error: str | None = None) -> int:
    print(json.dumps({"confirm": record, "error": error}, sort_keys=True))
    return code


def _decide(config: Config, log: Log, token: str) -> bool:
    """With the lock held: roll back a switch whose apply died or whose window is over (a confirmation that
    came first wins). False while the switch still waits for its confirmation."""
    record = read_record(config)
    if record is None or record.get("token") != token:
        return True
    if record["state"] == SWITCHING:
        # The switch of an `apply` that died may still run in its own session: let it end first.
        wait_for_previous_switch(config, log)
        reason = "the apply that started the switch ended before finishing it"
        if _changed(config, record):
            rollback_locked(config, log, record, reason)
        else:
            record.update(state=NOT_SWITCHED, reason=reason, finished_at=now())
            _write_record(config, record)
    elif record["state"] == AWAITING and time.time() >= float(record["confirm_by"]):
        window = float(record["window_seconds"])
        rollback_locked(config, log, record, f"not confirmed within {window:g}s of the switch")
    return record["state"] != AWAITING


def cmd_watchdog(config: Config, log: Log, token: str | None) -> int:
    """Wait for the switch `token` (default: the recorded one, after a reboot) to be confirmed; roll back when
    its window ends without confirmation, or when the `apply` that armed it died before finishing the switch."""
    if token is None:
        record = read_record(config)
        if record is None or record["state"] not in (SWITCHING, AWAITING):
            return 0
        token = str(record["token"])
        log(f"watchdog {token}: resumed ({record['state']})")
    while True:
        record = read_record(config)
        if record is None or record.get("token") != token or record["state"] not in (SWITCHING, AWAITING):
            return 0
        state = record["state"]
        due = state == AWAITING and time.time() >= float(record["confirm_by"])
        if state == SWITCHING or due:
            try:
                # While `apply` switches it holds the lock: a free lock and a record still switching means
                # it died. A confirmation in progress also holds it: wait for its outcome.
                with run_lock(config, 0.0 if state == SWITCHING else _LOCK_WAIT_SECONDS):
                    if _decide(config, log, token):
                        return 0
            except BusyError:
                if state == AWAITING:
                    log(f"watchdog {token}: the lock is still held after {_LOCK_WAIT_SECONDS:g}s; trying again")
        time.sleep(_WATCH_SECONDS)
