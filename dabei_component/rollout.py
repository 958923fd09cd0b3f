"""Safe in-place updates: health checks, the confirmation window, and rolling batches.

An in-place switch (`nix-dabei apply --confirm-seconds N`) must be confirmed by the deployer within N
seconds, over a new SSH connection with the pinned host key, after the health checks passed; the host rolls
itself back otherwise (nix/firstboot/dabei_firstboot/rollback.py). In-place updates go through the fleet in
batches of at most `max_unavailable` hosts; a batch with a failed host stops the rollout.

Wire forms (the first-boot step's inputs, snake_case): a health check is
`{"name", "command" | "http" | "tcp", "expect_status", "within_seconds", "timeout_seconds"}`; the rollout is
`{"max_unavailable": "1" | "25%", "confirm_seconds": float, "batches": [[name, ...], ...]}`, `batches`
filled in by the step's `check()` so that a preview shows how the rollout will go.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncssh

from .ssh import SshError, run
from .validation import Problem

DEFAULT_CONFIRM_SECONDS = 120.0
_PERCENT = re.compile(r"^(\d{1,3})%$")
_RETRY_SECONDS = 2.0
_OUTPUT_CHARS = 2000


@dataclass
class HealthCheck:
    """A check that must pass after a switch and after a first boot; exactly one of `command` (run on the
    host over SSH as root; passes on exit 0), `http` (a URL the deployer fetches; `{host}` stands for the
    host's address: its public IPv4, on an IPv6-only host its IPv6 address in brackets; passes on
    `expect_status`) or `tcp` (a port of that address the deployer connects to). Each attempt gets
    `timeout_seconds`; failed attempts are repeated every 2 s until the check passes or `within_seconds`
    have passed since the switch."""

    name: str | None = None
    command: str | None = None
    http: str | None = None
    tcp: int | None = None
    expect_status: int = 200
    within_seconds: float = 60.0
    timeout_seconds: float = 10.0

    def wire(self) -> dict[str, Any]:
        kind = "command" if self.command is not None else "http" if self.http is not None else "tcp"
        target = {"command": self.command, "http": self.http, "tcp": self.tcp}[kind]
        return {
            "name": self.name or f"{kind} {target}",
            kind: target,
            "expect_status": self.expect_status,
            "within_seconds": self.within_seconds,
            "timeout_seconds": self.timeout_seconds,
        }


@dataclass
class Rollout:
    """How in-place updates go through the fleet: at most `max_unavailable` hosts at once (a count, or a
    percentage of the fleet such as "25%", rounded down, at least one), each confirmed within
    `confirm_seconds` of its switch."""

    max_unavailable: int | str = 1
    confirm_seconds: float = DEFAULT_CONFIRM_SECONDS

    def wire(self) -> dict[str, Any]:
        return {"max_unavailable": str(self.max_unavailable), "confirm_seconds": float(self.confirm_seconds)}


def _seconds(prop: str, value: Any, low: float, high: float) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return [(prop, f"expected a number of seconds, got {value!r}")]
    if not low <= value <= high:
        return [(prop, f"expected between {low:g} and {high:g} seconds, got {value:g}")]
    return []


def _whole(value: Any, low: int, high: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return int(value) == value and low <= value <= high


def check_health_check(prop: str, value: Any) -> list[Problem]:
    """A health check in its wire form (the component checks its dataclass through `wire()`)."""
    if not isinstance(value, Mapping):
        return [(prop, f"expected a health check {{command | http | tcp, ...}}, got {type(value).__name__}")]
    kinds = [k for k in ("command", "http", "tcp") if value.get(k) is not None]
    if len(kinds) != 1:
        got = ", ".join(kinds) or "none"
        return [(prop, f"expected exactly one of command, http, tcp; got {got}")]
    problems: list[Problem] = []
    kind = kinds[0]
    target = value[kind]
    if kind == "command" and (not isinstance(target, str) or not target.strip()):
        problems.append((f"{prop}.command", f"expected a shell command, got {target!r}"))
    if kind == "http" and (not isinstance(target, str) or not re.match(r"^https?://[^\s/]+(/\S*)?$", target)):
        expected = "an http:// or https:// URL ({host} stands for the host's address)"
        problems.append((f"{prop}.http", f"expected {expected}, got {target!r}"))
    if kind == "tcp" and not _whole(target, 1, 65535):
        problems.append((f"{prop}.tcp", f"expected a port number between 1 and 65535, got {target!r}"))
    status = value.get("expect_status", 200)
    if not _whole(status, 100, 599):
        problems.append((f"{prop}.expect_status", f"expected an HTTP status code such as 200, got {status!r}"))
    problems += _seconds(f"{prop}.within_seconds", value.get("within_seconds", 60.0), 1, 3600)
    problems += _seconds(f"{prop}.timeout_seconds", value.get("timeout_seconds", 10.0), 1, 600)
    return problems


def check_rollout(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [(prop, f"expected {{max_unavailable, confirm_seconds}}, got {type(value).__name__}")]
    problems = check_max_unavailable(f"{prop}.max_unavailable", value.get("max_unavailable", "1"))
    problems += _seconds(f"{prop}.confirm_seconds", value.get("confirm_seconds", DEFAULT_CONFIRM_SECONDS), 5, 86400)
    return problems


def check_max_unavailable(prop: str, value: Any) -> list[Problem]:
    expected = "a number of hosts (1 or more) or a percentage of the fleet such as '25%'"
    if isinstance(value, bool):
        return [(prop, f"expected {expected}, got {value!r}")]
    if isinstance(value, int | float) and int(value) == value and value >= 1:
        return []
    if isinstance(value, str):
        match = _PERCENT.match(value.strip())
        if match and 1 <= int(match[1]) <= 100:
            return []
        if value.strip().isdigit() and int(value) >= 1:
            return []
    return [(prop, f"expected {expected}, got {value!r}")]


def batch_size(max_unavailable: int | str, fleet_size: int) -> int:
    """Hosts switched at once: a count as given, a percentage of the fleet rounded down, at least one."""
    text = str(max_unavailable).strip()
    match = _PERCENT.match(text)
    if match:
        return max(1, fleet_size * int(match[1]) // 100)
    return max(1, int(float(text)))


def plan_batches(names: list[str], max_unavailable: int | str, fleet_size: int) -> list[list[str]]:
    """The hosts to switch in place, in name order, cut into batches of `batch_size`."""
    size = batch_size(max_unavailable, fleet_size)
    ordered = sorted(names)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class HostNotTouched(Exception):
    """A host whose batch never started because an earlier batch failed."""


class RolloutGate:
    """Lets the hosts of batch n start once every host of the batches before it has finished, all of them
    well; after a failed batch, `enter` raises HostNotTouched for the hosts of later batches."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = batches
        self._batch_of = {name: i for i, batch in enumerate(batches) for name in batch}
        self._open = [len(batch) for batch in batches]
        self._failed: list[list[str]] = [[] for _ in batches]
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # made inside the step's event loop
            self._changed = asyncio.Condition()
        return self._changed

    def position(self, name: str) -> tuple[int, int]:
        """(batch number from 1, number of batches)."""
        return self._batch_of[name] + 1, len(self.batches)

    async def enter(self, name: str) -> None:
        index = self._batch_of[name]
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: all(self._open[i] == 0 for i in range(index)))
            for i in range(index):
                if self._failed[i]:
                    # Done without being touched: the batches after this one learn of the stop too.
                    self._open[index] -= 1
                    changed.notify_all()
                    raise HostNotTouched(
                        f"not updated: batch {i + 1} of {len(self.batches)} ({', '.join(self._failed[i])} failed) "
                        "stopped the rollout; this host keeps its system"
                    )

    async def leave(self, name: str, ok: bool) -> None:
        index = self._batch_of[name]
        changed = self._condition()
        async with changed:
            self._open[index] -= 1
            if not ok:
                self._failed[index].append(name)
            changed.notify_all()


@dataclass
class CheckFailure:
    name: str
    output: str

    def __str__(self) -> str:
        text = self.output.strip()[-_OUTPUT_CHARS:] or "(no output)"
        return f"health check {self.name!r} failed:\n" + "\n".join("    " + line for line in text.splitlines())


async def _attempt(check: Mapping[str, Any], address: str, conn: asyncssh.SSHClientConnection | None) -> str | None:
    """One attempt of a check: None when it passed, else what it said."""
    timeout = float(check.get("timeout_seconds", 10.0))
    if check.get("command") is not None:
        if conn is None:
            return "no SSH connection to the host"
        try:
            done = await run(conn, str(check["command"]), timeout=timeout, check=False)
        except SshError as exc:
            return str(exc)
        if done.exit_status == 0:
            return None
        return f"exit status {done.exit_status}\n{done.stdout}{done.stderr}"
    if check.get("http") is not None:
        # An IPv6 address stands in a URL in brackets (RFC 3986, section 3.2.2).
        url = str(check["http"]).replace("{host}", f"[{address}]" if ":" in address else address)
        expected = int(check.get("expect_status", 200))
        try:
            # trust_env off: the probe goes to the host itself, never through a proxy from the environment.
            async with (
                aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(url, allow_redirects=False) as answer,
            ):
                body = (await answer.text(errors="replace"))[:500]
                if answer.status == expected:
                    return None
                return f"GET {url}: HTTP {answer.status} (expected {expected})\n{body}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"GET {url}: {type(exc).__name__}: {exc}"
    port = int(check["tcp"])
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, TimeoutError) as exc:
        return f"TCP {address}:{port}: {type(exc).__name__}: {exc}"
    writer.close()
    return None


async def run_checks(
    checks: list[Mapping[str, Any]],
    address: str,
    conn: asyncssh.SSHClientConnection | None,
    deadline: float,
    log: Any,
) -> CheckFailure | None:
    """Run each check until it passes, within its own `within_seconds` and the monotonic `deadline`; the
    first that does not pass in time is returned with its last output."""
    started = time.monotonic()
    for check in checks:
        name = str(check.get("name"))
        give_up = min(deadline, started + float(check.get("within_seconds", 60.0)))
        attempts = 0
        while True:
            attempts += 1
            said = await _attempt(check, address, conn)
            if said is None:
                log(f"health check {name!r} passed")
                break
            if time.monotonic() + _RETRY_SECONDS >= give_up:
                return CheckFailure(name, f"after {attempts} attempt(s): {said}")
            await asyncio.sleep(_RETRY_SECONDS)
    return None
