"""Fixtures for the end-to-end tests: a simulator process, the real provider server, the local engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hcloud import Client

from dabei_component.demo import SimHandle, provider_config, simulator
from dabei_component.localup import LocalEngine
from dabei_component.provider_server import ProviderServer
from dabei_component.sim.client import ControlClient, free_port


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with simulator(tmp_path_factory.mktemp("sim"), free_port()) as handle:
        yield handle


@pytest.fixture(scope="module")
def control(sim: SimHandle) -> ControlClient:
    return ControlClient(sim.control_url, sim.token)


@pytest.fixture
def provider(sim: SimHandle, tmp_path: Path) -> Iterator[ProviderServer]:
    server = ProviderServer(
        project="nix-dabei", log_path=tmp_path / "provider.log", env={"XDG_CACHE_HOME": str(tmp_path / "cache")}
    )
    server.configure(provider_config(sim))
    yield server
    server.close()


@pytest.fixture
def engine(sim: SimHandle, provider: ProviderServer) -> LocalEngine:
    return LocalEngine(server=provider, hcloud=Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2))
