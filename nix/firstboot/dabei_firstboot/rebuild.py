"""Run the rebuild command (``nixos-rebuild switch --flake <flake>#<hostname>``) with bounded retries."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from .config import CURRENT_SYSTEM, Config
from .status import StatusRecorder

OUTPUT_TAIL_LINES = 20


class RebuildError(Exception):
    """Every rebuild attempt failed."""


def rebuild_argv(config: Config, flake: str, hostname: str) -> list[str]:
    return [arg.replace("{flake}", flake).replace("{hostname}", hostname) for arg in config.rebuild_command]


def current_system(config: Config) -> str | None:
    try:
        return os.readlink(config.path(CURRENT_SYSTEM))
    except OSError:
        return None


def _run_once(argv: list[str], timeout: float, log: Callable[[str], None]) -> tuple[int, str]:
    """Run one attempt in its own process group, log its output, return (exit code, output tail)."""
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"cannot start {argv[0]!r}: {exc.strerror or exc}"
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        for line in output.splitlines():
            log(f"rebuild| {line}")
        return -1, f"timed out after {timeout:g}s and was killed"
    for line in output.splitlines():
        log(f"rebuild| {line}")
    return process.returncode, "\n".join(output.strip().splitlines()[-OUTPUT_TAIL_LINES:])


def run_rebuild(
    config: Config,
    flake: str,
    hostname: str,
    status: StatusRecorder,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Rebuild until one attempt succeeds; returns the resulting system path. Raises RebuildError."""
    argv = rebuild_argv(config, flake, hostname)
    retries = config.rebuild_retries
    status.update(phase="rebuild", attempt=0, max_attempts=retries, flake=flake, hostname=hostname)
    error = ""
    for attempt in range(1, retries + 1):
        status.update(attempt=attempt)
        log(f"rebuild attempt {attempt}/{retries}: {' '.join(argv)}")
        code, tail = _run_once(argv, config.rebuild_timeout_seconds, log)
        if code == 0:
            return current_system(config)
        error = f"rebuild attempt {attempt}/{retries} ({' '.join(argv)}) failed (exit {code}): {tail}"
        log(error)
        status.update(last_error=error)
        if attempt < retries:
            sleep(config.rebuild_backoff_seconds * attempt)
    raise RebuildError(f"rebuild failed {retries} times; last: {error}")
