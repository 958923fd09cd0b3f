"""After convergence: `delete` of every step twice, and `read` (pulumi refresh) of a host that was
reinstalled behind the component's back, through the real provider server."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dabei_firstboot.config import HOST_KEY
from hcloud import Client
from hcloud.servers import Server
from relhelpers import DYNAMIC, SimThread, Stack, fleet_args

from dabei_component.keys import fingerprint, generate_ssh_keypair
from dabei_component.ssh import connect, run

pytestmark = pytest.mark.timeout(300)


def urn(key: str) -> str:
    return f"urn:pulumi:local::nix-dabei::{key}"


async def host_status(stack: Stack, name: str) -> dict[str, Any]:
    keys = stack.keys()
    host = stack.hosts("firstboot")[name]
    conn, _ = await connect(
        host["ipv4"],
        port=stack.sim.ssh_port,
        client_key=keys["deploy_private_key"],
        host_key=keys["host_public_keys"][name],
        deadline=asyncio.get_running_loop().time() + 30,
    )
    async with conn:
        done = await run(conn, "nix-dabei status", timeout=30)
    return json.loads(done.stdout)


def test_deleting_every_step_twice_succeeds_and_leaves_the_host_alone(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    stack.up(fleet_args(stack.name, ssh_port=sim.ssh_port))
    name = stack.name + "-1"
    steps = {k: r for k, r in stack.state.items() if k.startswith(DYNAMIC)}
    assert len(steps) == 6  # keys, the host's key, image, rescue, install, firstboot

    server = stack.provider()
    mark = sim.api.mark()
    try:
        for _ in range(2):
            for key, recorded in steps.items():
                server.delete(urn(key), recorded.id, recorded.outputs)
    finally:
        server.close()

    # The steps own nothing outside the server: deleting them made no API call and the host still runs.
    assert sim.api.since(mark) == []
    assert asyncio.run(host_status(stack, name))["status"]["phase"] == "converged"


def test_refresh_of_a_host_reinstalled_behind_our_back_reports_drift(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    stack.up(fleet_args(stack.name, ssh_port=sim.ssh_port))
    name = stack.name + "-1"
    key = f"{DYNAMIC}::{stack.name}-firstboot"
    recorded = stack.state[key]
    server = stack.provider()
    try:
        # A refresh of the untouched host: what it runs, no drift.
        fresh = server.read(urn(key), recorded.id, recorded.outputs)[0]["hosts"][name]
        assert fresh["system"] == recorded.outputs["hosts"][name]["system"]
        assert fresh.get("drift") is None

        # Someone reinstalls the server: it comes back with another host key.
        server_id = int(recorded.outputs["hosts"][name]["server_id"])
        host_key = Path(sim.server(server_id)["machine"]["rootfs"]) / HOST_KEY
        other = generate_ssh_keypair()
        host_key.write_text(other.private_openssh)
        os.chmod(host_key, 0o600)
        client = Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
        client.servers.reboot(Server(id=server_id)).wait_until_finished()

        drifted = server.read(urn(key), recorded.id, recorded.outputs)[0]["hosts"][name]
    finally:
        server.close()
    assert drifted.get("system") is None
    generated = stack.keys()["host_public_keys"][name]
    assert f"presented another host key than the pinned {fingerprint(generated)}" in drifted["drift"]
    # The read reports; it neither fails nor changes the recorded inputs.
    assert drifted["flake"] == recorded.outputs["hosts"][name]["flake"]
