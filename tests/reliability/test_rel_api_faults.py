"""Hetzner API faults during the steps: error answers (429 with RateLimit-Reset, locked, 500/502/503), an
action that ends in error, an action slower than the step's deadline.

Expected: retried with backoff where retrying is safe, and then `up` succeeds; otherwise a clear error that
names the host, the step, the server and the API's error. Every API answer is counted (the simulator runs
in-process with a response observer), so the tests also check that retries stay within a small budget.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from relhelpers import Answer, SimThread, Stack, fleet_args, when_created

from dabei_component.component import Deadlines
from dabei_component.localup import LocalEngine, UpFailed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def no_faults_left(sim: SimThread) -> Iterator[None]:
    yield
    sim.control("DELETE", "/faults")


def answers_to(answers: list[Answer], method: str, path: str) -> list[int]:
    return [a.status for a in answers if a.method == method and fnmatch.fnmatchcase(a.path, path)]


def converged(stack: Stack) -> None:
    hosts = stack.hosts("firstboot")
    assert all(h.get("system") for h in hosts.values()), hosts


class FaultsAfter:
    """Sets the API faults once the engine created the resource `kind` (see `when_created`), and notes
    where the simulator's answer log stood then (`mark`)."""

    def __init__(self, sim: SimThread, kind: str, faults: dict[str, Any]) -> None:
        self.sim, self.kind, self.faults = sim, kind, faults
        self.mark: int | None = None

    def __call__(self, engine: LocalEngine) -> None:
        when_created(engine, self.kind, lambda _id, _outs: self.set())

    def set(self) -> None:
        if self.mark is None:
            self.mark = self.sim.api.mark()
            self.sim.set_api_faults(self.faults)

    def answers(self) -> list[Answer]:
        assert self.mark is not None, "the faults were never set"
        return self.sim.api.since(self.mark)


@pytest.mark.parametrize(
    ("method", "path", "fault"),
    [
        # The budget is spent: 429 with RateLimit-Reset; the wrapper backs off (the library does not).
        ("POST", "/servers/*/actions/enable_rescue", {"status": 429, "code": "rate_limit_exceeded", "count": 2}),
        # Another action holds the server.
        ("POST", "/servers/*/actions/reset", {"code": "locked", "count": 3}),
        # The API is briefly unavailable: the request was not processed, so even a reset is repeated.
        ("POST", "/servers/*/actions/reset", {"code": "service_error", "count": 2}),
        # Outcome unknown, but reading is always safe to repeat.
        ("GET", "/servers/*", {"code": "server_error", "count": 2}),
        # A gateway error in front of the API.
        ("POST", "/servers/*/actions/enable_rescue", {"status": 502, "code": "bad_gateway", "count": 2}),
    ],
    ids=["429", "locked", "503", "500-read", "502"],
)
def test_transient_api_errors_are_retried_and_up_succeeds(
    sim: SimThread, new_stack: Callable[[], Stack], method: str, path: str, fault: dict[str, Any]
) -> None:
    stack = new_stack()
    faults = FaultsAfter(sim, "server", {"api": [{"method": method, "path": path, **fault}]})
    stack.up(fleet_args(stack.name, ssh_port=sim.ssh_port), before=faults)

    converged(stack)
    statuses = answers_to(faults.answers(), method, path)
    injected = [s for s in statuses if s >= 400]
    assert len(injected) == fault["count"], statuses
    # Each injected error cost exactly one more request: retries, not a storm.
    assert statuses[fault["count"]] < 300, statuses
    assert sim.ratelimit()["remaining"] > 0
    # Retried by the wrapper within the step's deadline (the hcloud library's own retries are off).
    assert f"{fault['code']}: injected fault: {fault['code']}" in stack.log_text()
    assert "; retrying in" in stack.log_text()


def test_a_reset_with_unknown_outcome_is_not_repeated_and_a_rerun_finishes(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    """A 500 on a reset may mean the server did reset; a second reset could boot it out of rescue again."""
    stack = new_stack()
    args = fleet_args(stack.name, ssh_port=sim.ssh_port)
    spec = {"api": [{"method": "POST", "path": "/servers/*/actions/reset", "code": "server_error", "count": 1}]}
    faults = FaultsAfter(sim, "server", spec)
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=faults)
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"rescue failed on 1 of 1 host(s):\n  {name}: reset on server " in text
    assert "server_error: injected fault: server_error (not retried: the request may have taken effect)" in text
    assert answers_to(faults.answers(), "POST", "/servers/*/actions/reset") == [500]

    stack.up(args)
    converged(stack)


def test_an_action_that_ends_in_error_is_reported_and_a_rerun_finishes(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    """The reset that boots the written disk fails, at the end of the install step."""
    stack = new_stack()
    args = fleet_args(stack.name, ssh_port=sim.ssh_port)
    spec = {"actions": [{"command": "reset_server", "count": 1}]}
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=FaultsAfter(sim, "rescue", spec))
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"install failed on 1 of 1 host(s):\n  {name}: reset on server " in text
    assert "failed: action_failed: injected action failure" in text

    stack.up(args)
    converged(stack)
    # The server never left the pinned rescue session, so the re-run wrote there again.
    assert "entering rescue again" not in stack.log_text()
    assert f"[{name}] install: writing the image" in stack.log_text()


def test_an_action_slower_than_the_deadline_fails_at_the_deadline_and_a_rerun_waits_out_the_lock(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=3, install=180, firstboot=120))
    faults = FaultsAfter(sim, "server", {"slow_actions": [{"command": "reset_server", "extra_seconds": 8, "count": 1}]})
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=faults)
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"rescue failed on 1 of 1 host(s):\n  {name}: reset on server " in text
    assert "still running at the step's deadline" in text
    # Polled about once a second for the 3 s deadline, not in a tight loop.
    polls = answers_to(faults.answers(), "GET", "/actions/*")
    assert 1 <= len(polls) <= 6, polls

    # The slow reset still holds the server: the re-run meets `locked` and waits it out.
    args.deadlines.rescue = 120
    stack.up(args)
    converged(stack)
    assert "enable rescue on server" in stack.log_text() and "locked" in stack.log_text()


def test_a_spent_rate_limit_fails_the_step_by_its_deadline_naming_the_limit_and_its_reset(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    """The hourly budget is spent (429, `RateLimit-Reset` an hour away): the step ends by its deadline and
    says so, instead of one call sitting in the hcloud library's own backoff past the deadline."""
    stack = new_stack()
    args = fleet_args(stack.name, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=6, install=180, firstboot=120))
    spent = {"status": 429, "code": "rate_limit_exceeded", "reset_seconds": 3600, "seconds": 60}
    faults = FaultsAfter(sim, "server", {"api": [{"method": "*", "path": "*", **spent}]})
    started = time.monotonic()
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=faults)
    took = time.monotonic() - started
    text = str(failed.value)
    name = stack.name + "-1"
    # The step's first call (reading the server, before rescue is enabled) meets the spent budget.
    assert f"rescue failed on 1 of 1 host(s):\n  {name}: get server " in text
    assert "rate_limit_exceeded: injected fault: rate_limit_exceeded; RateLimit-Reset says the budget is full" in text
    assert re.search(r"UTC \(in 3[56]\d\d s\) \(still failing at the step's deadline\)", text), text
    assert "not done within the step's deadline" not in text
    # Within the deadline (and the engine's own work around it), not after five library backoffs.
    assert took < 6 + 20, took
    # The wrapper's backoff (1, 2, 4 s) within the 6 s: three or four attempts. The library's own retries
    # would make six requests for the first call alone.
    assert 2 <= len(answers_to(faults.answers(), "GET", "/servers/[0-9]*")) <= 4
    assert answers_to(faults.answers(), "POST", "/servers/*/actions/enable_rescue") == []
