"""Fixtures for the end-to-end tests: a simulator process, the real provider server, the local engine."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hcloud import Client

from dabei_component.demo import SimHandle, provider_config, simulator
from dabei_component.localup import LocalEngine
from dabei_component.provider_server import ProviderServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimControl:
    """The simulator's control API (`/_sim/...`)."""

    def __init__(self, sim: SimHandle) -> None:
        self.sim = sim
        self.base = sim.endpoint.rsplit("/v1", 1)[0] + "/_sim"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.sim.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def server(self, server_id: int | str) -> dict[str, Any]:
        return self.request("GET", f"/servers/{int(server_id)}")["server"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with simulator(tmp_path_factory.mktemp("sim"), free_port()) as handle:
        yield handle


@pytest.fixture(scope="module")
def control(sim: SimHandle) -> SimControl:
    return SimControl(sim)


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
