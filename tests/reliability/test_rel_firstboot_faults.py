"""First-boot faults: the metadata service down for a while, the rebuild failing twice then succeeding, the
rebuild always failing, and an installed host that presents another host key than the generated one.

The installed system is the simulator's: the real first-boot program (`nix-dabei`) on the server's root
filesystem with a fake `nixos-rebuild` whose failures a file controls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from relhelpers import SimThread, Stack, fleet_args, when_created

from dabei_component.component import Deadlines
from dabei_component.keys import fingerprint
from dabei_component.localup import LocalEngine, UpFailed

pytestmark = pytest.mark.timeout(300)


def rootfs(sim: SimThread, server_id: int | str) -> Path:
    return Path(sim.server(server_id)["machine"]["rootfs"])


def fail_rebuilds(sim: SimThread, how: str) -> Callable[[LocalEngine], None]:
    """Make the server's next rebuilds fail (`N` of them, or `always`) from its creation on."""

    def write(id_: str, _outs: dict[str, Any]) -> None:
        state = rootfs(sim, id_) / "var/lib/nix-dabei-sim"
        state.mkdir(parents=True, exist_ok=True)
        (state / "fail-rebuilds").write_text(how + "\n")

    return lambda engine: when_created(engine, "server", write)


def test_metadata_down_for_a_while_is_waited_for(sim: SimThread, new_stack: Callable[[], Stack]) -> None:
    stack = new_stack()

    def outage(_id: str, outs: dict[str, Any]) -> None:
        for host in outs["hosts"].values():
            sim.set_api_faults({"metadata": [{"server_id": int(host["server_id"]), "status": 503, "count": 4}]})

    try:
        stack.up(fleet_args(stack.name, ssh_port=sim.ssh_port), before=lambda e: when_created(e, "rescue", outage))
    finally:
        sim.control("DELETE", "/faults")

    host = stack.hosts("firstboot")[stack.name + "-1"]
    assert host["system"]
    log = (rootfs(sim, host["server_id"]) / "var/log/nix-dabei/firstboot.log").read_text()
    assert "metadata attempt 4/" in log and "failed: HTTP 503" in log
    assert "metadata attempt 5/" not in log


def test_a_rebuild_failing_twice_then_succeeding_converges(sim: SimThread, new_stack: Callable[[], Stack]) -> None:
    stack = new_stack()
    stack.up(fleet_args(stack.name, ssh_port=sim.ssh_port), before=fail_rebuilds(sim, "2"))

    host = stack.hosts("firstboot")[stack.name + "-1"]
    assert host["system"]
    root = rootfs(sim, host["server_id"])
    status = json.loads((root / "var/lib/nix-dabei/status.json").read_text())
    assert status["phase"] == "converged" and status["attempt"] == 3
    assert (root / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines() == ["github:example/infra"]


def test_a_rebuild_that_always_fails_is_reported_with_status_and_journal_and_a_fixed_rerun_converges(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=120, install=180, firstboot=60))
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=fail_rebuilds(sim, "always"))
    text = str(failed.value)
    name = stack.name + "-1"
    assert (
        f"firstboot failed on 1 of 1 host(s):\n  {name}: first boot failed in phase 'failed' after 3 attempt(s)" in text
    )
    assert "journal tail:" in text
    assert f"building the system of github:example/infra#{name} failed (simulated failure)" in text
    # Reported from the host's status, not by running into the step's deadline.
    assert "deadline" not in text

    # The cause fixed, the same `up` again: the failed first boot gets its rebuild again and converges.
    server_id = stack.hosts("install")[name]["server_id"]
    (rootfs(sim, server_id) / "var/lib/nix-dabei-sim/fail-rebuilds").write_text("0\n")
    stack.up(args)
    assert stack.hosts("firstboot")[name]["system"]
    assert f"[{name}] firstboot: the first boot had failed" in stack.log_text()
    assert stack.operations[f"pulumi-python:dynamic:Resource::{stack.name}-install"] == "same"


def test_an_installed_host_with_another_host_key_is_refused(sim: SimThread, new_stack: Callable[[], Stack]) -> None:
    """The installed system never comes up; an impostor answers on its address with its own key."""
    stack = new_stack()
    impostor_key = asyncssh.generate_private_key("ssh-ed25519")
    listeners: list[Any] = []

    def break_boot(_id: str, outs: dict[str, Any]) -> None:
        for host in outs["hosts"].values():
            sim.set_ssh_faults(host["server_id"], {"boot_hook_fails": True})

    async def listen(address: str) -> asyncssh.SSHAcceptor:
        return await asyncssh.listen(address, sim.ssh_port, server_host_keys=[impostor_key], reuse_address=True)

    def impostor(_id: str, outs: dict[str, Any]) -> None:
        for host in outs["hosts"].values():
            listeners.append(sim.run(listen(host["ipv4"])))

    def before(engine: LocalEngine) -> None:
        when_created(engine, "rescue", break_boot)
        when_created(engine, "install", impostor)

    args = fleet_args(stack.name, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=120, install=180, firstboot=30))
    try:
        with pytest.raises(UpFailed) as failed:
            stack.up(args, before=before)
    finally:
        for listener in listeners:
            listener.close()
            sim.run(listener.wait_closed())
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"firstboot failed on 1 of 1 host(s):\n  {name}: refusing the host: ssh root@" in text
    generated = stack.keys()["host_public_keys"][name]
    assert f"presented another host key than the pinned {fingerprint(generated)}" in text
