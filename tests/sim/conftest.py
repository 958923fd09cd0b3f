"""Fixtures for the simulator's API tests: a started simulator whose every response is validated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hcloud
import pytest
from simhelpers import RECORDER, make_sim

from dabei_component.sim import Simulator


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    """A started simulator whose responses are all checked against the OpenAPI document."""
    failures_before = len(RECORDER.failures)
    thread = make_sim(tmp_path / "state")
    thread.start()
    try:
        yield thread.sim
    finally:
        thread.stop()
    new_failures = RECORDER.failures[failures_before:]
    assert not new_failures, "responses that do not match the OpenAPI document:\n" + "\n".join(new_failures)


@pytest.fixture
def client(sim: Simulator) -> hcloud.Client:
    return hcloud.Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.05)
