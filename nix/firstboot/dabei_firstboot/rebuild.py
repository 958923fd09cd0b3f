"""Run the rebuild command (``nixos-rebuild switch --flake <flake>#<hostname>``) with bounded retries."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable

from .config import CURRENT_SYSTEM, Config
from .status import StatusRecorder

OUTPUT_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# switch-to-configuration exits 4 when it switched but some units failed (nixpkgs
# nixos/modules/system/activation/switch-to-configuration-ng). The Bash nixos-rebuild passes the 4 on;
# nixos-rebuild-ng exits 1 with "Command '... switch-to-configuration switch' returned non-zero exit
# status 4." (pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/__init__.py, main()).
SWITCHED_WITH_FAILED_UNITS = 4
_NG_EXIT_4 = re.compile(r"switch-to-configuration \S+' returned non-zero exit status 4\.")
_FAILED_UNITS = re.compile(r"the following units failed: (.+)")


class RebuildError(Exception):
    """Every rebuild attempt failed."""


def rebuild_argv(config: Config, flake: str, hostname: str) -> list[str]:
    return [arg.replace("{flake}", flake).replace("{hostname}", hostname) for arg in config.rebuild_command]


def current_system(config: Config) -> str | None:
    try:
        return os.readlink(config.path(CURRENT_SYSTEM))
    except OSError:
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the program that started it dies (prctl PR_SET_PDEATHSIG, Linux
    prctl(2)). A rebuild never outlives the run that watches it: the confirmation watchdog decides about a
    switch only once no rebuild of a dead `apply` can still start one."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run_once(argv: list[str], timeout: float, log: Callable[[str], None]) -> tuple[int, str]:
    """Run one attempt in its own process group, log its output, return (exit code, output)."""
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with_parent,  # the program is single-threaded
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
    return process.returncode, output


def switched_with_failed_units(code: int, output: str) -> list[str] | None:
    """The units a switch reported as failed when it switched anyway (exit 4), else None."""
    if code != SWITCHED_WITH_FAILED_UNITS and not (code != 0 and _NG_EXIT_4.search(output)):
        return None
    units: list[str] = []
    for match in _FAILED_UNITS.finditer(output):
        units += [u.strip() for u in match.group(1).split(",") if u.strip() and u.strip() not in units]
    return units


def wait_for_previous_switch(config: Config, log: Callable[[str], None]) -> None:
    """Run ``switch_wait_command``: a switch of a killed attempt may still run in its transient unit, and a
    new one under the same unit name would fail to start. Failures are logged, not fatal."""
    if config.switch_wait_command is None:
        return
    code, output = _run_once(list(config.switch_wait_command), config.rebuild_timeout_seconds, log)
    if code != 0:
        log(f"waiting for an earlier switch to end failed (exit {code}): {output.strip()[-300:]}")


def run_rebuild(
    config: Config,
    flake: str,
    hostname: str,
    status: StatusRecorder,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str | None, list[str]]:
    """Rebuild until one attempt succeeds; returns the resulting system path and the units the switch
    reported as failed (a switch that exits 4 has switched: it converged, with those units named).
    Raises RebuildError."""
    argv = rebuild_argv(config, flake, hostname)
    retries = config.rebuild_retries
    status.update(phase="rebuild", attempt=0, max_attempts=retries, flake=flake, hostname=hostname)
    error = ""
    for attempt in range(1, retries + 1):
        status.update(attempt=attempt)
        wait_for_previous_switch(config, log)
        log(f"rebuild attempt {attempt}/{retries}: {' '.join(argv)}")
        code, output = _run_once(argv, config.rebuild_timeout_seconds, log)
        if code == 0:
            return current_system(config), []
        failed_units = switched_with_failed_units(code, output)
        if failed_units is not None:
            log(f"switched, but these units failed: {', '.join(failed_units) or '(not named by the switch)'}")
            return current_system(config), failed_units
        tail = "\n".join(output.strip().splitlines()[-OUTPUT_TAIL_LINES:])
        error = f"rebuild attempt {attempt}/{retries} ({' '.join(argv)}) failed (exit {code}): {tail}"
        log(error)
        status.update(last_error=error)
        if attempt < retries:
            sleep(config.rebuild_backoff_seconds * attempt)
    raise RebuildError(f"rebuild failed {retries} times; last: {error}")
