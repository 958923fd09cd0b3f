"""50 servers booted into rescue at once (real sshd, real loop devices), and nothing left after stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncssh
import hcloud
from hcloud.images import Image
from hcloud.server_types import ServerType
from simhelpers import RECORDER, ipv4, key_ids, loop_devices_under, make_sim, sim_processes

FLEET = 50


def wait_for_actions(client: hcloud.Client, ids: list[int], timeout: float = 120) -> list[dict]:
    """Poll GET /actions?id=...&id=... like the Go client until none is running."""
    deadline = time.monotonic() + timeout
    while True:
        actions: list[dict] = []
        for start in range(0, len(ids), 50):
            chunk = ids[start : start + 50]
            actions += client.request("GET", "/actions", params={"id": chunk, "per_page": 50})["actions"]
        if all(a["status"] != "running" for a in actions):
            return actions
        assert time.monotonic() < deadline, "actions still running"
        time.sleep(0.2)


async def rescue_facts(ip: str, port: int, key: asyncssh.SSHKey, gate: asyncio.Semaphore) -> str:
    async with (
        gate,
        asyncssh.connect(ip, port, username="root", client_keys=[key], known_hosts=None) as conn,
    ):
        result = await conn.run("echo $(hostname) $(test -b /dev/sda && echo block-device)", check=True)
        return str(result.stdout).strip()


async def check_all(servers: list[tuple[str, int]], key: asyncssh.SSHKey) -> list[str]:
    gate = asyncio.Semaphore(10)
    return list(await asyncio.gather(*(rescue_facts(ip, port, key, gate) for ip, port in servers)))


def test_fifty_servers_boot_into_rescue_at_once_and_stop_cleans_up() -> None:
    thread = make_sim(None)  # a temporary state directory, removed on stop
    thread.start()
    failures_before = len(RECORDER.failures)
    try:
        sim = thread.sim
        state_dir = str(sim.state_dir)
        client = hcloud.Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
        private = asyncssh.generate_private_key("ssh-ed25519")
        key = client.ssh_keys.create(name="fleet", public_key=private.export_public_key().decode())
        created = [
            client.servers.create(
                name=f"fleet-{i:02d}",
                server_type=ServerType(name="cx22"),
                image=Image(name="debian-12"),
                ssh_keys=[key],
                start_after_create=False,
            )
            for i in range(FLEET)
        ]
        assert {a["status"] for a in wait_for_actions(client, [c.action.id for c in created])} == {"success"}
        rescues = [client.servers.enable_rescue(c.server, ssh_keys=key_ids(key)).action.id for c in created]
        assert {a["status"] for a in wait_for_actions(client, rescues)} == {"success"}
        boots = [client.servers.power_on(c.server).id for c in created]
        booted = wait_for_actions(client, boots)
        assert [a["error"] for a in booted if a["status"] != "success"] == []

        servers = client.servers.get_all()
        assert len(servers) == FLEET and {s.status for s in servers} == {"running"}
        addresses = [ipv4(s) for s in servers]
        assert len(set(addresses)) == FLEET
        facts = asyncio.run(check_all([(ip, sim.ssh_port) for ip in addresses], private))
        assert facts == ["rescue block-device"] * FLEET
        assert len(loop_devices_under(state_dir)) == FLEET
        assert len(sim_processes(state_dir)) >= FLEET
    finally:
        thread.stop()
    assert RECORDER.failures[failures_before:] == []
    assert sim_processes(state_dir) == []
    assert loop_devices_under(state_dir) == []
    assert not Path(state_dir).exists()
