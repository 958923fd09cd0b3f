"""The deployer's uplink model: one bandwidth shared by the deployer's connections, not by relays.

Real machines (sshd in namespaces, loop disks) behind the uplink proxy; the bucket's arithmetic is checked
against a recorded clock, so no test depends on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from test_machine import connect, make_spec, public_line, run

from dabei_component.sim import Simulator
from dabei_component.sim import uplink as uplink_module
from dabei_component.sim.client import ControlClient, free_port
from dabei_component.sim.machine import Machine
from dabei_component.sim.uplink import Uplink


@pytest.fixture
def client_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Machine, Machine, Uplink]]:
    machines = []
    for name in ("relay-a", "relay-b"):
        spec = make_spec(tmp_path / name, name=name)
        machines.append(Machine(spec, ssh_port=free_port(spec.ipv4)))
    uplink = Uplink(lambda: {m.spec.ipv4 for m in machines})
    for machine in machines:
        machine.uplink = uplink
    try:
        yield machines[0], machines[1], uplink
    finally:
        for machine in machines:
            await machine.destroy()


def test_the_bucket_spreads_the_deployer_bytes_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(uplink_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(uplink_module.time, "sleep", sleep)
    line = Uplink(lambda: set())
    line.configure({"bits_per_second": 100e6})
    for _ in range(200):
        line.send(62_500)  # 200 x 62.5 kB = 12.5 MB: one second of a 100 Mbit/s line
    assert sum(slept) == pytest.approx(1.0 - uplink_module._BURST_SECONDS, abs=1e-6)
    assert line.to_json() == {"bits_per_second": 100e6, "deployer_bytes": 12_500_000, "server_bytes": 0}
    # An idle line does not save up more than the burst: the next second is paced again.
    now[0] += 60
    slept.clear()
    for _ in range(200):
        line.send(62_500)
    assert sum(slept) == pytest.approx(1.0 - uplink_module._BURST_SECONDS, abs=1e-6)
    line.configure({"bits_per_second": None, "reset_counters": True})
    slept.clear()
    line.send(10**9)
    assert slept == [] and line.to_json()["deployer_bytes"] == 10**9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"bits_per_second": 0}, "bits_per_second must be a number in (0, 1e12] or null, got 0"),
        ({"bits_per_second": "fast"}, "got 'fast'"),
        ({"bits_per_second": True}, "got True"),
        ({"reset_counters": "yes"}, "reset_counters must be true or false"),
        ({"bandwidth": 1}, "unknown uplink setting(s) ['bandwidth']"),
    ],
)
def test_bad_uplink_settings_are_named_and_change_nothing(body: Any, message: str) -> None:
    line = Uplink(lambda: set())
    line.configure({"bits_per_second": 5e6})
    with pytest.raises(ValueError) as raised:
        line.configure(body)
    assert message in str(raised.value)
    assert line.bits_per_second == 5e6


async def test_deployer_bytes_are_counted_and_relays_pass_unlimited(
    pair: tuple[Machine, Machine, Uplink], client_key: asyncssh.SSHKey
) -> None:
    a, b, uplink = pair
    uplink.configure({"bits_per_second": 1e9})
    keys = [public_line(client_key)]
    await a.boot_rescue(keys)
    await b.boot_rescue(keys)
    assert a.describe()["uplink_proxy"] is True
    # Root's keys are where Hetzner's rescue reads them; ssh from the rescue system binds to its address.
    listing = await run(a, client_key, "cat /root/.ssh/authorized_keys; grep -i bindaddress /etc/ssh/ssh_config")
    assert str(listing.stdout).split("\n")[:2] == [keys[0], f"    BindAddress {a.spec.ipv4}"]

    payload = os.urandom(2 * 1024 * 1024)
    before = uplink.to_json()
    async with await connect(a, client_key) as conn:
        await conn.run("cat > /dev/null", input=payload, encoding=None, check=True)
    after = uplink.to_json()
    assert after["deployer_bytes"] - before["deployer_bytes"] > len(payload)
    assert after["server_bytes"] == before["server_bytes"]

    # From a's rescue system to b's SSH, as a relay goes: counted as traffic between servers.
    private = client_key.export_private_key().decode()
    await run(a, client_key, f"umask 077; cat > /root/relay_key <<'EOF'\n{private}EOF")
    relay = (
        f"head -c 3000000 /dev/urandom | ssh -i /root/relay_key -p {b.ssh_port} -o BatchMode=yes"
        f" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@{b.spec.ipv4} 'cat > /dev/null'"
    )
    before = uplink.to_json()
    await run(a, client_key, relay)
    after = uplink.to_json()
    assert after["server_bytes"] - before["server_bytes"] > 3_000_000
    # Only the command itself went over the deployer's line.
    assert after["deployer_bytes"] - before["deployer_bytes"] < 100_000


async def test_a_relay_fault_cuts_only_connections_from_servers(
    pair: tuple[Machine, Machine, Uplink], client_key: asyncssh.SSHKey
) -> None:
    a, b, uplink = pair
    b.set_faults({"drop_relays_after_bytes": 1})
    keys = [public_line(client_key)]
    await a.boot_rescue(keys)
    await b.boot_rescue(keys)
    # No limit set, yet the proxy is there for the fault; the deployer's connections pass.
    assert uplink.bits_per_second is None and b.describe()["uplink_proxy"] is True
    assert str((await run(b, client_key, "hostname")).stdout).strip() == "rescue"
    # A connection from a's address is cut at once.
    with socket.create_connection((b.spec.ipv4, b.ssh_port), timeout=10, source_address=(a.spec.ipv4, 0)) as s:
        s.sendall(b"SSH-2.0-test\r\n")
        s.settimeout(10)
        try:
            data = s.recv(1024)
            while data:
                data = s.recv(1024)
        except ConnectionResetError:
            pass
    assert str((await run(b, client_key, "hostname")).stdout).strip() == "rescue"


def test_the_control_api_sets_and_reports_the_uplink(sim: Simulator) -> None:
    control = ControlClient(sim.control_url, sim.token)
    assert control.request("GET", "/uplink")["uplink"] == {
        "bits_per_second": None,
        "deployer_bytes": 0,
        "server_bytes": 0,
    }
    assert control.request("PUT", "/uplink", {"bits_per_second": 100e6})["uplink"]["bits_per_second"] == 100e6
    with pytest.raises(urllib.error.HTTPError) as refused:
        control.request("PUT", "/uplink", {"bits_per_second": -1})
    body = json.loads(refused.value.read())
    assert refused.value.code == 400 and body["error"]["code"] == "invalid_input"
    assert "bits_per_second must be a number" in json.dumps(body)
    assert control.request("GET", "/uplink")["uplink"]["bits_per_second"] == 100e6
