"""The provider process killed in the middle of each step, then the same `up` again with a new provider
server and the recorded state: the host ends converged, a host that is already installed is not written
again, and nothing that was done is lost (the same server, the same generated keys).

The kill comes from the provider's own output: at the first line that matches the step's pattern the
server gets SIGKILL, as a crash at that moment would. Slower simulated actions keep the step busy there.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relhelpers import Answer, KillSwitch, SimThread, Stack, fleet_args

from dabei_component.demo import FIXTURE_FLAKE
from dabei_component.localup import UpFailed

pytestmark = pytest.mark.timeout(300)

SERVER = "hcloud:index/server:Server::"


@dataclass(frozen=True)
class KillPoint:
    # Kill at the first provider output line matching this regular expression (`{name}`: the host's name),
    pattern: str | None = None
    # or at the n-th successful API answer to (method, path glob).
    api_answer: tuple[str, str, int] | None = None
    big_image: bool = False
    durations: dict[str, float] = field(default_factory=dict)
    # Writes of the image in the run after the kill, and whether the install step found the host installed.
    writes_after: int = 1
    found_installed: bool = False


KILL_POINTS = {
    "image-build": KillPoint(r"image: building"),
    "rescue-reset": KillPoint(r"\[{name}\] rescue: enabling rescue and resetting", durations={"reset": 1.0}),
    "rescue-pinned": KillPoint(r"\[{name}\] rescue: ssh \S+: pinned host key"),
    "install-stream": KillPoint(r"\[{name}\] install: writing the image", big_image=True),
    # While the reset into the written disk runs (the rescue step made the first reset).
    "install-boot": KillPoint(
        api_answer=("POST", "/servers/*/actions/reset", 2),
        durations={"reset": 1.0},
        writes_after=0,
        found_installed=True,
    ),
    "firstboot-wait": KillPoint(r"\[{name}\] firstboot: phase", durations={"rebuild": 2.0}, writes_after=0),
}


@pytest.fixture
def durations(sim: SimThread) -> Iterator[Callable[[dict[str, float]], None]]:
    before = sim.control("GET", "/durations")["durations"]
    yield lambda changes: sim.control("PUT", "/durations", changes)
    sim.control("PUT", "/durations", before)


def kill_switch(sim: SimThread, kill: KillPoint, name: str) -> KillSwitch:
    if kill.pattern is not None:
        return KillSwitch(kill.pattern.format(name=re.escape(name)))
    assert kill.api_answer is not None
    switch = KillSwitch()
    method, path, nth = kill.api_answer
    seen = 0

    def on_answer(answer: Answer) -> None:
        nonlocal seen
        if answer.method == method and fnmatch.fnmatchcase(answer.path, path) and answer.status < 300:
            seen += 1
            if seen == nth:
                switch.fire()

    sim.api.listeners.append(on_answer)
    return switch


def wait_for_server_record(stack: Stack) -> None:
    """The engine creates servers itself, on threads that outlive a failed `up`: let it record them."""
    deadline = time.monotonic() + 60
    while not any(k.startswith(SERVER) for k in stack.state):
        assert time.monotonic() < deadline, "the server was never recorded"
        time.sleep(0.1)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_provider_then_rerun_converges_without_redoing_work(
    sim: SimThread,
    new_stack: Callable[[], Stack],
    big_image_flake: Path,
    durations: Callable[[dict[str, float]], None],
    point: str,
) -> None:
    kill = KILL_POINTS[point]
    stack = new_stack()
    name = stack.name + "-1"
    image_flake = big_image_flake if kill.big_image else FIXTURE_FLAKE
    args = fleet_args(stack.name, image_flake=image_flake, ssh_port=sim.ssh_port)
    durations(kill.durations)

    switch = kill_switch(sim, kill, name)
    try:
        with pytest.raises(UpFailed):
            stack.up(args, kill=switch)
    finally:
        sim.api.listeners.clear()
    wait_for_server_record(stack)
    server_ids = {r.id for k, r in stack.state.items() if k.startswith(SERVER)}
    keys_before = stack.keys()
    durations({})

    outputs = stack.up(args)

    host = stack.hosts("firstboot")[name]
    assert host["system"] and outputs["hosts"][name]["system"] == host["system"]
    # The same server and the same identities: nothing recorded before the kill was lost or redone.
    assert {r.id for k, r in stack.state.items() if k.startswith(SERVER)} == server_ids
    assert stack.keys()["host_public_keys"] == keys_before["host_public_keys"]
    assert stack.keys()["deploy_public_key"] == keys_before["deploy_public_key"]
    assert [s["name"] for s in sim.control("GET", "/servers")["servers"]].count(name) == 1
    rerun = stack.log_text()
    assert rerun.count(f"[{name}] install: writing the image") == kill.writes_after
    assert (f"[{name}] install: already installed" in rerun) == kill.found_installed
