"""Fixtures of the reliability tests: one simulator per module, a shared image cache, stacks per test."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from relhelpers import SimThread, Stack, make_image_flake


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimThread]:
    thread = SimThread(tmp_path_factory.mktemp("sim"))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME of every provider server: each image is compressed once for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def big_image_flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_flake(tmp_path_factory.mktemp("image") / "flake")


@pytest.fixture
def new_stack(sim: SimThread, image_cache: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Stack]:
    """Stacks named after the test, so that server names never collide within a module's simulator."""
    words = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_")).strip("-")
    base = words[:28].strip("-") + "-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    count = 0

    def make() -> Stack:
        nonlocal count
        count += 1
        work = tmp_path / f"stack-{count}"
        work.mkdir()
        return Stack(sim, work, image_cache, f"{base}-{count}")

    return make
