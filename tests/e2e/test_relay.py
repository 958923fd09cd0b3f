"""End to end: hosts in rescue relay the image among themselves, so it crosses the deployer's uplink once.

The simulator's uplink model tells the deployer's connections from connections between servers (see
dabei_component/sim/uplink.py), so these tests see which path the image took. Each `up` runs through the
real provider server against real sshd, zstd and loop disks.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from test_fleet import dynamic_state, host_status

from dabei_component.demo import SimHandle, demo_args
from dabei_component.localup import HCLOUD_SERVER, LocalEngine, Recorded, UpFailed, generated_keys
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer
from dabei_component.sim.client import ControlClient

pytestmark = pytest.mark.timeout(900)


def relay_keys_left(control: ControlClient, server_id: Any) -> list[str]:
    """Lines of the ephemeral relay key still in the rescue system's /root/.ssh/authorized_keys."""
    state_dir = Path(control.server(server_id)["state_dir"])
    keys = state_dir / "rescue/root/.ssh/authorized_keys"
    return [line for line in keys.read_text().splitlines() if "dabei-relay" in line]


def break_relays_to(control: ControlClient, names: dict[str, dict[str, Any]]) -> Any:
    """A listener that sets SSH faults on named servers as soon as they exist (before their rescue boot)."""

    def listener(key: str, rec: Recorded, _op: str) -> None:
        if key.startswith(HCLOUD_SERVER):
            for name, faults in names.items():
                if key.endswith(f"::{name}-server"):
                    control.set_ssh_faults(rec.id, faults)

    return listener


def test_hosts_relay_the_image_and_one_broken_relay_falls_back(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, provider: ProviderServer
) -> None:
    # An uplink proxy on every server (fast, so the test stays quick) counts what the deployer sends.
    control.request("PUT", "/uplink", {"bits_per_second": 1e9, "reset_counters": True})
    try:
        args = demo_args(4, ssh_port=sim.ssh_port, prefix="relay")
        # Host 2 is in the middle of the tree (host 1 feeds 2 and 3, host 2 feeds 4): every connection from
        # another server to it is cut at once, so neither it nor host 4 gets the relayed stream.
        engine.listeners.append(break_relays_to(control, {"fr-relay-2": {"drop_relays_after_bytes": 1}}))
        outputs = engine.up(lambda: declare(args, name="fr"))
        uplink = control.request("GET", "/uplink")["uplink"]
    finally:
        control.request("PUT", "/uplink", {"bits_per_second": None})

    keys = generated_keys(engine.state, "fr")
    install = dynamic_state(engine, "fr-install").outputs["hosts"]
    assert sorted(outputs["hosts"]) == ["relay-1", "relay-2", "relay-3", "relay-4"]
    for name, host in outputs["hosts"].items():
        public = keys["host_public_keys"][name]
        status = asyncio.run(host_status(host["ipv4"], sim.ssh_port, keys["deploy_private_key"], public))
        assert status["status"]["phase"] == "converged", (name, status)
        assert relay_keys_left(control, install[name]["server_id"]) == []

    log = provider.log_path.read_text()
    assert "[relay-1] install: writing the image to /dev/sda" in log
    assert "streamed from the deployer, relayed to 3 more host(s), 2 per host" in log
    for name, parent in (("relay-2", "relay-1"), ("relay-3", "relay-1"), ("relay-4", "relay-2")):
        assert f"[{name}] install: writing the image to /dev/sda, relayed from {parent}" in log

    # Host 3 was fed by host 1 and needed no direct stream; hosts 2 and 4 fell back to one.
    def direct(name: str) -> bool:
        return (
            re.search(rf"\[{name}\] install: writing the image to /dev/sda \(.*\), streamed directly", log) is not None
        )

    for name in ("relay-2", "relay-4"):
        assert f"[{name}] install: write attempt 1 failed" in log
        assert direct(name)
    assert "(relayed from relay-1: " in log and "(relayed from relay-2)" in log
    for name in ("relay-1", "relay-3"):
        assert f"[{name}] install: write attempt 1 failed" not in log
        assert not direct(name)
    # Server-to-server bytes flowed (host 1 to host 3), so the relay really carried the image.
    assert uplink["server_bytes"] > 0


def test_a_relay_that_meets_another_host_key_is_refused_and_cleaned_up(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, provider: ProviderServer
) -> None:
    args = demo_args(3, ssh_port=sim.ssh_port, prefix="rekey")
    # Connections to host 3's rescue: the rescue step's, the install step's probe for an installed system
    # and its pinned session, then the relay from host 1, which meets a new host key. The relaying host
    # must refuse it (it pins the key the rescue step pinned); the direct retry then meets the new key
    # too, and the host is refused.
    engine.listeners.append(break_relays_to(control, {"fk-rekey-3": {"change_host_key_after_connections": 3}}))
    with pytest.raises(UpFailed) as failed:
        engine.up(lambda: declare(args, name="fk"))
    text = str(failed.value)
    assert "rekey-3" in text and "changed its host key within one session" in text
    assert "rekey-1" not in text and "rekey-2" not in text

    log = provider.log_path.read_text()
    # The relaying host refused the new key (OpenSSH names the key it was sent), nothing was relayed.
    assert "[rekey-3] install: write attempt 1 failed: writing /dev/sda: no stream reached the host" in log
    assert "(relayed from rekey-1: " in log and "key sent by the remote host" in log
    # ssh's own lines, then its exit status, each readable: joined by "; ".
    assert "Host key verification failed.; the relay's ssh exited with status 255" in log
    servers = [rec for key, rec in engine.state.items() if key.startswith(HCLOUD_SERVER) and "rekey" in key]
    assert len(servers) == 3
    # The ephemeral key is gone from every rescue system, the failed one included.
    for rec in servers:
        assert relay_keys_left(control, rec.id) == []
