"""The status file (``var/lib/nix-dabei/status.json``), the first-boot log and small file helpers."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import LOG_FILE, STATUS_FILE, Config

PHASES = ("seed", "metadata", "network", "rebuild", "converged", "failed")
STATUS_VERSION = 1
MAX_ERROR_CHARS = 4000


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_boot_id(config: Config) -> str:
    try:
        return config.boot_id_path.read_text(encoding="ascii").strip()
    except OSError:
        return "unknown"


def read_status(config: Config) -> dict[str, Any] | None:
    path = config.path(STATUS_FILE)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"status file {path} is unreadable: {exc}") from None
    return value if isinstance(value, dict) else None


def patch_status(config: Config, **changes: Any) -> None:
    """Change fields of the status file outside a run (a rollback); `finished_at` moves with the phase."""
    doc = read_status(config) or {"version": STATUS_VERSION, "attempt": 0, "max_attempts": 1}
    doc.update(changes)
    doc["updated_at"] = now()
    if changes.get("phase") in ("converged", "failed"):
        doc["finished_at"] = doc["updated_at"]
    doc["boot_id"] = read_boot_id(config)
    write_json(config.path(STATUS_FILE), doc)


class StatusRecorder:
    """Keeps the status document of one run and rewrites the file at every change."""

    def __init__(self, config: Config, phase: str, max_attempts: int = 1) -> None:
        self.config = config
        previous = read_status(config) or {}
        stamp = now()
        self.doc: dict[str, Any] = {
            "version": STATUS_VERSION,
            "phase": phase,
            "attempt": 0,
            "max_attempts": max_attempts,
            "started_at": stamp,
            "updated_at": stamp,
            "finished_at": None,
            "last_error": None,
            # Units a converged switch reported as failed (it exited 4: switched, some units failed).
            "failed_units": [],
            # What a previous run learned stays until this run learns better.
            "system": previous.get("system"),
            "flake": previous.get("flake"),
            "hostname": previous.get("hostname"),
            "boot_id": read_boot_id(config),
        }
        self._write()

    def update(self, **changes: Any) -> None:
        phase = changes.get("phase")
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        if "last_error" in changes and changes["last_error"] is not None:
            changes["last_error"] = str(changes["last_error"])[-MAX_ERROR_CHARS:]
        self.doc.update(changes)
        self.doc["updated_at"] = now()
        if phase in ("converged", "failed"):
            self.doc["finished_at"] = self.doc["updated_at"]
        self._write()

    def fail(self, error: str) -> None:
        self.update(phase="failed", last_error=error)

    def _write(self) -> None:
        write_json(self.config.path(STATUS_FILE), self.doc)


class Log:
    """Log lines to stderr (the journal on a host) and to the first-boot log file under ``root``."""

    def __init__(self, config: Config) -> None:
        self.path = config.path(LOG_FILE)

    def __call__(self, message: str) -> None:
        line = f"{now()} {message}"
        # The SSH session that started the run may be gone: the run goes on, the file keeps the log.
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr, flush=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            print(f"cannot append to {self.path}: {exc}", file=sys.stderr, flush=True)

    def tail(self, lines: int = 60) -> str | None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return "\n".join(text.splitlines()[-lines:])
