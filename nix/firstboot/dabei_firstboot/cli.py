"""The host CLI ``nix-dabei``: seed, firstboot, network, status, apply, receive (see docs/architecture.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import grow as growlib
from . import rollback
from . import seed as seedlib
from .config import (
    FLAKE_FILE,
    FLAKES_DIR,
    HOST_KEY,
    PENDING_MARKER,
    PERSISTENT_INSTANCE_DATA,
    ROOT_AUTHORIZED_KEYS,
    RUNTIME_INSTANCE_DATA,
    SEED_RECORD,
    Config,
    ConfigError,
    load_config,
)
from .lock import BusyError, run_lock
from .metadata import MetadataError, fetch_metadata, instance_data
from .network import NetworkError, apply_network
from .rebuild import RebuildError, current_system, run_rebuild
from .status import Log, StatusRecorder, now, read_boot_id, read_status, write_atomic, write_json

# Block devices that never hold the installed system's disk.
_SKIPPED_BLOCK_PREFIXES = ("loop", "ram", "zram", "sr", "dm-", "md", "nbd", "zd")


def find_seed_device(config: Config) -> str:
    if config.seed_device != "auto":
        return config.seed_device
    candidates = sorted(name for name in os.listdir("/sys/block") if not name.startswith(_SKIPPED_BLOCK_PREFIXES))
    found = []
    for name in candidates:
        try:
            seedlib.find_seed_partition(f"/dev/{name}")
            found.append(f"/dev/{name}")
        except seedlib.SeedError:
            continue
    if len(found) != 1:
        raise seedlib.SeedError(
            f"expected one disk with a {seedlib.PARTITION_NAME!r} partition among {candidates}, found {found}"
        )
    return found[0]


# A torn read of the GPT (another unit rewriting it, the kernel re-reading it) is retried for this long.
SEED_READ_ATTEMPTS = 10
SEED_READ_PAUSE_SECONDS = 0.5
SEED_WIPE_ATTEMPTS = 3
T = TypeVar("T")


def _retried(what: str, attempts: int, log: Log, action: Callable[[], T]) -> T:
    """`action` until it succeeds, at most ``attempts`` tries apart; SeedEmpty (nothing to read) at once."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except seedlib.SeedEmpty:
            raise
        except seedlib.SeedError as exc:
            if attempt == attempts:
                raise
            log(f"{what} failed (attempt {attempt}/{attempts}), trying again: {exc}")
            time.sleep(SEED_READ_PAUSE_SECONDS)
    raise AssertionError("unreachable")


def _read_seed(config: Config, log: Log, attempts: int) -> tuple[str, dict[str, Any]]:
    """Find and decode the seed; SeedEmpty at once, other SeedErrors after ``attempts`` tries."""

    def read() -> tuple[str, dict[str, Any]]:
        device = find_seed_device(config)
        return device, seedlib.read_seed(device)

    return _retried("reading the seed", attempts, log, read)


def _wipe(device: str, log: Log) -> None:
    _retried("wiping the seed", SEED_WIPE_ATTEMPTS, log, lambda: seedlib.wipe_seed(device))


def _read_record(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def cmd_seed(config: Config, log: Log) -> int:
    """Runs on every boot and decides by the partition's content: a new seed is applied, recorded and
    wiped; a seed already recorded (an earlier wipe failed or was cut off) is only wiped; an empty
    partition with a record is success."""
    record_path = config.path(SEED_RECORD)
    applied = record_path.exists()
    try:
        # Later boots read once: the partition table is only rewritten on the first boot (growing).
        device, doc = _read_seed(config, log, 1 if applied else SEED_READ_ATTEMPTS)
    except seedlib.SeedEmpty:
        if applied:
            log("seed already applied; the seed partition is empty")
            return 0
        return _fail_seed(config, log, "the seed partition is empty and no seed was ever applied")
    except seedlib.SeedError as exc:
        if applied:
            # Nothing to apply on this boot; the status of the first boot stays as it is.
            log(f"seed already applied; no seed partition to check: {exc}")
            return 0
        return _fail_seed(config, log, f"cannot read the seed: {exc}")
    fingerprint = seedlib.seed_fingerprint(doc)
    if _read_record(record_path).get("fingerprint") == fingerprint:
        log(f"the seed on {device} was applied before but not wiped; wiping it now")
        try:
            _wipe(device, log)
        except seedlib.SeedError as exc:
            return _fail_seed(config, log, f"wiping the applied seed failed (the next boot tries again): {exc}")
        return 0
    status = StatusRecorder(config, "seed")
    try:
        key = doc["host_key"]
        write_atomic(config.path(HOST_KEY), (key["private"].strip() + "\n").encode(), mode=0o600)
        write_atomic(config.path(f"{HOST_KEY}.pub"), (key["public"].strip() + "\n").encode(), mode=0o644)
        # The seed is the authority for root's keys: exactly its list (keys from the configuration are
        # in /etc/ssh/authorized_keys.d, written by NixOS).
        keys = "".join(line.strip() + "\n" for line in doc["authorized_keys"])
        write_atomic(config.path(ROOT_AUTHORIZED_KEYS), keys.encode(), mode=0o600)
        write_atomic(config.path(FLAKE_FILE), (doc["flake"] + "\n").encode())
        record = {
            "applied_at": now(),
            "device": device,
            "fingerprint": fingerprint,
            "flake": doc["flake"],
            "hostname": doc.get("hostname"),
            "host_key_public": key["public"].strip(),
            "authorized_keys": len(doc["authorized_keys"]),
            "boot_id": read_boot_id(config),
        }
        write_json(record_path, record)
        config.path(PENDING_MARKER).touch()
    except OSError as exc:
        status.fail(f"applying the seed failed: {exc}")
        log(f"applying the seed failed: {exc}")
        return 1
    status.update(flake=doc["flake"], hostname=doc.get("hostname"))
    log(f"seed applied from {device}: host key, {len(doc['authorized_keys'])} authorized key(s), flake")
    try:
        _wipe(device, log)
    except seedlib.SeedError as exc:
        # Applied and recorded: the first boot goes on; the next boot finds the seed again and wipes it.
        log(f"wiping the seed failed (the next boot tries again): {exc}")
        return 1
    return 0


def _fail_seed(config: Config, log: Log, error: str) -> int:
    log(error)
    StatusRecorder(config, "seed").fail(error)
    return 1


def _write_instance_data(config: Config, data: dict[str, Any]) -> None:
    write_json(config.path(RUNTIME_INSTANCE_DATA), data)
    write_json(config.path(PERSISTENT_INSTANCE_DATA), data)


def _read_flake(config: Config) -> str:
    try:
        flake = config.path(FLAKE_FILE).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RebuildError(f"no flake reference at {config.path(FLAKE_FILE)}: {exc.strerror or exc}") from None
    if not flake:
        raise RebuildError(f"flake reference file {config.path(FLAKE_FILE)} is empty")
    return flake


def _converge(config: Config, log: Log, fetch: bool, new_flake: str | None = None) -> int:
    try:
        with run_lock(config):
            if new_flake is not None:
                write_atomic(config.path(FLAKE_FILE), (new_flake + "\n").encode())
                config.path(PENDING_MARKER).touch()
            return _converge_locked(config, log, fetch)
    except BusyError as exc:
        log(str(exc))
        return 1


def _apply_confirmed(config: Config, log: Log, flake: str, window_seconds: float) -> int:
    """The switch of `apply --confirm-seconds`: armed before, its window opened (or undone) after."""
    try:
        with run_lock(config):
            try:
                record = rollback.arm(config, log, window_seconds, flake)
            except (rollback.RollbackError, OSError, subprocess.TimeoutExpired) as exc:
                log(f"not switching: {exc}")
                StatusRecorder(config, "failed").fail(f"not switching: {exc}")
                return 1
            write_atomic(config.path(FLAKE_FILE), (flake + "\n").encode())
            config.path(PENDING_MARKER).touch()
            code = _converge_locked(config, log, fetch=False)
            error = None if code == 0 else (read_status(config) or {}).get("last_error")
            rollback.after_switch(config, log, record, code == 0, error)
            return code
    except BusyError as exc:
        log(str(exc))
        return 1


def _converge_locked(config: Config, log: Log, fetch: bool) -> int:
    """metadata (if ``fetch`` or none persisted) -> network -> rebuild; status file at every step."""
    status = StatusRecorder(config, "metadata", max_attempts=config.metadata_retries)
    try:
        flake = _read_flake(config)
        persisted = config.path(PERSISTENT_INSTANCE_DATA)
        if fetch or not persisted.exists():
            log(f"fetching metadata from {config.metadata_url}")
            meta = fetch_metadata(
                config.metadata_url,
                config.metadata_retries,
                config.metadata_backoff_seconds,
                config.metadata_backoff_max_seconds,
                config.metadata_timeout_seconds,
                log,
            )
            data = instance_data(meta)
            _write_instance_data(config, data)
        else:
            data = json.loads(persisted.read_text(encoding="utf-8"))
        status.update(phase="network", hostname=data["hostname"], flake=flake)
        log(f"network: {apply_network(config, data)} for {data['mac_address']}")
        _wait_for_source(config, flake, log)
        system, failed_units = run_rebuild(config, flake, data["hostname"], status, log)
    except (MetadataError, NetworkError, RebuildError, OSError, ValueError, KeyError) as exc:
        status.fail(str(exc))
        log(f"failed: {exc}")
        return 1
    status.update(phase="converged", system=system, last_error=None, failed_units=failed_units)
    config.path(PENDING_MARKER).unlink(missing_ok=True)
    log(f"converged: {system}")
    return 0


_SENT_SOURCE = re.compile(r"^path:/" + re.escape(FLAKES_DIR) + r"/([0-9a-f]{32})(\?|$)")


def _wait_for_source(config: Config, flake: str, log: Log, poll: float = 1.0) -> None:
    """A flake the deployer sends (`nix-dabei receive`, after the host booted): wait until it is here."""
    match = _SENT_SOURCE.match(flake)
    if match is None:
        return
    directory = config.path(f"{FLAKES_DIR}/{match[1]}")
    deadline = time.monotonic() + config.source_wait_seconds
    if not directory.is_dir():
        log(f"waiting up to {config.source_wait_seconds:g} s for the deployer to send the flake source {match[1]}")
    while not directory.is_dir():
        if time.monotonic() >= deadline:
            raise RebuildError(
                f"the flake source {match[1]} was not sent within {config.source_wait_seconds:g} s "
                f"(the deployer sends it over SSH once the host is up)"
            )
        time.sleep(poll)


def cmd_receive(config: Config, log: Log, source_id: str) -> int:
    """Unpack a flake source (a tar stream on stdin) into FLAKES_DIR/<id>, complete or not at all."""
    if not re.fullmatch(r"[0-9a-f]{32}", source_id):
        print(f"nix-dabei receive: invalid source id {source_id!r}", file=sys.stderr)
        return 2
    target = config.path(f"{FLAKES_DIR}/{source_id}")
    if target.is_dir():
        while sys.stdin.buffer.read(1 << 20):  # already here: the same content, by its id
            pass
        print(json.dumps({"received": source_id, "new": False}))
        return 0
    partial = target.with_name(f".{source_id}.tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as archive:
            # The "data" filter refuses links out of the tree, device files and absolute names.
            archive.extractall(partial, filter="data")
        os.replace(partial, target)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"nix-dabei receive: {exc}", file=sys.stderr)
        return 1
    log(f"received flake source {source_id}")
    print(json.dumps({"received": source_id, "new": True}))
    return 0


_STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[0-9A-Za-z+\-._?=]+")


def cmd_missing(config: Config, paths: list[str]) -> int:
    """Print (JSON list) which of these store paths the host's Nix store lacks."""
    bad = [p for p in paths if not _STORE_PATH.fullmatch(p)]
    if bad:
        print(f"nix-dabei receive: not store paths: {', '.join(map(repr, bad))}", file=sys.stderr)
        return 2
    done = subprocess.run(
        [*config.nix_store_command, "--check-validity", "--print-invalid", *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"nix-dabei receive: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    print(json.dumps(done.stdout.split()))
    return 0


def cmd_receive_inputs(config: Config, log: Log) -> int:
    """Import flake inputs into the host's Nix store: stdin is a zstd-compressed `nix-store --export`
    stream, piped from the decompressor into `nix-store --import` (which adds each path whole or not at
    all). Prints {"imported": [store paths]}."""
    decompress = subprocess.Popen(config.decompress_command, stdin=sys.stdin.buffer, stdout=subprocess.PIPE)
    assert decompress.stdout is not None
    try:
        done = subprocess.run(
            [*config.nix_store_command, "--import"], stdin=decompress.stdout, capture_output=True, text=True
        )
    finally:
        decompress.stdout.close()
        unpacked = decompress.wait()
    if unpacked != 0 or done.returncode != 0:
        why = done.stderr.strip()[-500:] or f"{config.decompress_command[0]} exit status {unpacked}"
        print(f"nix-dabei receive: importing the flake inputs failed: {why}", file=sys.stderr)
        return 1
    imported = done.stdout.split()
    log(f"received {len(imported)} flake input(s): {' '.join(imported)}")
    print(json.dumps({"imported": imported}))
    return 0


def cmd_firstboot(config: Config, log: Log) -> int:
    if not config.path(PENDING_MARKER).exists():
        log(f"nothing to do: {config.path(PENDING_MARKER)} does not exist")
        return 0
    return _converge(config, log, fetch=True)


def cmd_network(config: Config, log: Log) -> int:
    """Every boot: recreate the runtime networkd file from the persistent instance data."""
    persisted = config.path(PERSISTENT_INSTANCE_DATA)
    if not persisted.exists():
        return 0
    try:
        data = json.loads(persisted.read_text(encoding="utf-8"))
        write_json(config.path(RUNTIME_INSTANCE_DATA), data)
        # Runs before networkd starts, which then reads the file itself.
        log(f"network: {apply_network(config, data, reload=False)} for {data['mac_address']}")
    except (OSError, ValueError, KeyError, NetworkError, MetadataError) as exc:
        log(f"network configuration from {persisted} failed: {exc}")
        return 1
    return 0


def status_report(config: Config, log: Log) -> dict[str, Any]:
    status = read_status(config)
    journal = None
    if status is not None and status.get("phase") == "failed":
        journal = _journal_tail(config) or log.tail()
    return {
        "status": status,
        "boot_id": read_boot_id(config),
        "system": current_system(config),
        "journal": journal,
        "generation": rollback.current_generation(config)[0],
        "confirm": rollback.read_record(config),
        "features": list(rollback.FEATURES),
    }


def _journal_tail(config: Config) -> str | None:
    if config.journal_command is None:
        return None
    try:
        result = subprocess.run(list(config.journal_command), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def cmd_status(config: Config, log: Log) -> int:
    print(json.dumps(status_report(config, log), sort_keys=True))
    return 0


def cmd_apply(config: Config, log: Log, flake: str, confirm_seconds: float | None) -> int:
    if not flake or any(c.isspace() for c in flake):
        print(f"nix-dabei apply: invalid flake reference {flake!r}", file=sys.stderr)
        return 2
    if confirm_seconds is None:
        code = _converge(config, log, fetch=False, new_flake=flake)
    else:
        # The deployer may go away mid-switch: the switch finishes, and the watchdog decides.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        code = _apply_confirmed(config, log, flake, confirm_seconds)
    with contextlib.suppress(OSError):  # nobody may read the answer any more
        print(json.dumps(status_report(config, log), sort_keys=True))
    return code


def cmd_grow(config: Config, log: Log) -> int:
    """Every boot, after `seed`: the ZFS partition and pool take the whole disk (see grow.py)."""
    try:
        disk = find_seed_device(config)
        result = growlib.grow(disk, config.grow_pool)
    except (seedlib.SeedError, growlib.GrowError) as exc:
        log(f"grow: {exc}")
        return 1
    log(f"grow: {growlib.describe(disk, result)}")
    return 0


def cmd_authorized_keys(config: Config, log: Log) -> int:
    """Replace root's authorized keys with the lines on stdin (one OpenSSH public key each), atomically.
    The component sends the deploy key with the user's keys, so it can always log in again."""
    keys = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    bad = [line for line in keys if len(line.split()) < 2 or line.startswith("#")]
    if not keys or bad:
        print(f"nix-dabei authorized-keys: expected one public key per line, got {len(keys)} line(s)", file=sys.stderr)
        return 2
    path = config.path(ROOT_AUTHORIZED_KEYS)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(keys) + "\n").encode(), mode=0o600)
    log(f"authorized-keys: root has {len(keys)} key(s)")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected between 1 and 86400 seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nix-dabei", description="nix-dabei first-boot program")
    parser.add_argument(
        "--config", help="configuration JSON (default: $NIX_DABEI_CONFIG or /etc/nix-dabei/config.json)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("seed", help="apply the per-host seed and wipe it")
    sub.add_parser("firstboot", help="metadata, network and rebuild, when the pending marker exists")
    sub.add_parser("network", help="configure the uplink from the persisted instance data")
    sub.add_parser("status", help="print the status as JSON")
    sub.add_parser("grow", help="grow the ZFS partition and pool to the whole disk")
    sub.add_parser("authorized-keys", help="replace root's authorized keys with the keys on stdin")
    apply = sub.add_parser("apply", help="switch to a flake and rebuild")
    apply.add_argument("--flake", required=True, help="flake reference, e.g. github:me/hosts")
    apply.add_argument(
        "--confirm-seconds",
        type=_seconds,
        help="roll back unless `nix-dabei confirm` comes within this many seconds of the switch",
    )
    confirm = sub.add_parser("confirm", help="confirm a switch started by `apply --confirm-seconds`")
    confirm.add_argument("--token", required=True, help="the switch's token (`confirm.token` of apply's answer)")
    back = sub.add_parser("rollback", help="return a switch that waits for confirmation to the generation before")
    back.add_argument("--token", required=True, help="the switch's token")
    back.add_argument("--reason", default="rolled back by the deployer", help="recorded with the rollback")
    watchdog = sub.add_parser("watchdog", help="roll a switch back when it is not confirmed in time")
    watchdog.add_argument("--token", help="the switch to watch (default: the recorded one, after a reboot)")
    receive = sub.add_parser("receive", help="take what the deployer sends: a flake source or its inputs")
    what = receive.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="unpack a flake source (tar on stdin) under this id (32 hex digits)")
    what.add_argument("--inputs", action="store_true", help="import flake inputs (nix-store --export | zstd)")
    what.add_argument("--missing", nargs="+", metavar="STORE_PATH", help="print which of these the store lacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"nix-dabei: {exc}", file=sys.stderr)
        return 2
    log = Log(config)
    if args.command == "seed":
        return cmd_seed(config, log)
    if args.command == "firstboot":
        return cmd_firstboot(config, log)
    if args.command == "network":
        return cmd_network(config, log)
    if args.command == "status":
        return cmd_status(config, log)
    if args.command == "receive":
        if args.missing:
            return cmd_missing(config, args.missing)
        if args.inputs:
            return cmd_receive_inputs(config, log)
        return cmd_receive(config, log, args.source)
    if args.command == "grow":
        return cmd_grow(config, log)
    if args.command == "authorized-keys":
        return cmd_authorized_keys(config, log)
    if args.command == "confirm":
        return rollback.cmd_confirm(config, log, args.token)
    if args.command == "rollback":
        return rollback.cmd_rollback(config, log, args.token, args.reason)
    if args.command == "watchdog":
        return rollback.cmd_watchdog(config, log, args.token)
    return cmd_apply(config, log, args.flake, args.confirm_seconds)


if __name__ == "__main__":
    sys.exit(main())
