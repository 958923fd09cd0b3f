"""SSH faults at the worst moment of each step: the rescue system unreachable for a while, the connection
cut at several offsets of the image stream, the rescue host key changing within a session, a host that is
not a rescue system, a disk smaller than the image.

Each test runs `up` through the real provider server against the simulator, whose servers are real sshd
processes with a loop device as /dev/sda; SSH faults are set on a server right after it is created, so
they apply to its rescue boot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from relhelpers import PAYLOAD_BYTES, SimThread, Stack, disk_untouched, fleet_args, when_created

from dabei_component.localup import LocalEngine, UpFailed

pytestmark = pytest.mark.timeout(300)


def set_faults_on_creation(sim: SimThread, faults: dict[str, Any]) -> Callable[[LocalEngine], None]:
    def before(engine: LocalEngine) -> None:
        when_created(engine, "server", lambda id_, _outs: sim.set_ssh_faults(id_, faults))

    return before


def converged(stack: Stack) -> dict[str, Any]:
    hosts = stack.hosts("firstboot")
    assert all(h.get("system") and h.get("drift") is None for h in hosts.values()), hosts
    return hosts


def test_rescue_unreachable_for_a_while_is_waited_for(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)
    stack.up(args, before=set_faults_on_creation(sim, {"refuse_for_seconds": 4}))

    converged(stack)
    log = stack.log_text()
    assert "rescue: ssh root@" in log and "attempt 1 failed" in log and "retrying in" in log
    server_id = stack.hosts("rescue")[f"{stack.name}-1"]["server_id"]
    assert "ssh refuses connections for 4s" in sim.boot_log(server_id)


@pytest.mark.parametrize("offset", [64 * 1024, PAYLOAD_BYTES // 3, PAYLOAD_BYTES - 1024 * 1024])
def test_a_dropped_stream_is_written_again_and_the_host_converges(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path, offset: int
) -> None:
    """Every connection of the rescue boot is cut after `offset` bytes; the fault is lifted for later boots.
    The step retries over a new connection (cut again), then in a fresh rescue session, which succeeds."""
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)

    def lift_fault(_id: str, outs: dict[str, Any]) -> None:
        for host in outs["hosts"].values():
            sim.set_ssh_faults(host["server_id"], {"drop_after_bytes": None})

    def before(engine: LocalEngine) -> None:
        set_faults_on_creation(sim, {"drop_after_bytes": offset})(engine)
        when_created(engine, "rescue", lift_fault)

    stack.up(args, before=before)

    converged(stack)
    log = stack.log_text()
    name = stack.name + "-1"
    assert f"[{name}] install: write attempt 1 failed: writing /dev/sda failed" in log
    assert f"[{name}] install: write attempt 2 failed" in log and "retrying in a fresh rescue session" in log
    assert "write attempt 3" not in log
    install = stack.hosts("install")[name]
    rescue = stack.hosts("rescue")[name]
    assert install["bytes_sent"] > PAYLOAD_BYTES
    # Written in the fresh rescue session, not the one the rescue step pinned.
    assert install["rescue_boot_id"] != rescue["rescue_boot_id"]


def test_a_stream_dropped_in_every_session_fails_clearly_and_a_rerun_finishes(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)
    offset = PAYLOAD_BYTES // 2
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=set_faults_on_creation(sim, {"drop_after_bytes": offset}))
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"install failed on 1 of 1 host(s):\n  {name}: writing /dev/sda failed after" in text
    assert "gave up after 3 attempts" in text

    server_id = stack.hosts("rescue")[name]["server_id"]
    sim.set_ssh_faults(server_id, {"drop_after_bytes": None})
    stack.up(args)
    converged(stack)
    rerun = stack.log_text()
    assert "the server was restarted since the pinned rescue session; entering rescue again" in rerun
    assert "write attempt" not in rerun


def test_a_rescue_host_key_change_within_the_session_is_refused(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path
) -> None:
    """The rescue step pins the key on the first connection; from the second on, sshd has another key,
    and the server was not restarted in between: nothing may be written."""
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)
    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=set_faults_on_creation(sim, {"change_host_key_after_connections": 1}))
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"install failed on 1 of 1 host(s):\n  {name}: refusing to write" in text
    assert "changed its host key within one session" in text and "the server was not restarted since" in text
    server_id = stack.hosts("rescue")[name]["server_id"]
    assert disk_untouched(sim, server_id)
    assert "writing the image" not in stack.log_text()


def test_a_host_that_is_not_a_rescue_system_is_never_written(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)
    created: list[str] = []

    def before(engine: LocalEngine) -> None:
        set_faults_on_creation(sim, {"not_rescue": True})(engine)
        when_created(engine, "server", lambda id_, _outs: created.append(id_))

    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=before)
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"rescue failed on 1 of 1 host(s):\n  {name}: refusing to write: the host is not a rescue system" in text
    assert f"hostname {name!r}" in text
    assert disk_untouched(sim, created[0])
    assert "install" not in stack.operations.get(f"pulumi-python:dynamic:Resource::{stack.name}-install", "")


def test_a_disk_smaller_than_the_image_is_refused_before_writing(
    sim: SimThread, new_stack: Callable[[], Stack], big_image_flake: Path
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, image_flake=big_image_flake, ssh_port=sim.ssh_port)

    def shrink_disk(id_: str, _outs: dict[str, Any]) -> None:
        # The simulated disk is a sparse file, attached as /dev/sda when rescue boots.
        os.truncate(sim.server(id_)["machine"]["disk_path"], 32 * 1024 * 1024)

    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=lambda engine: when_created(engine, "server", shrink_disk))
    text = str(failed.value)
    name = stack.name + "-1"
    assert f"install failed on 1 of 1 host(s):\n  {name}: disk /dev/sda refused: it holds 0.03 GiB (33554432" in text
    assert "the image needs 0.06 GiB (67108864 bytes)" in text
    assert "write attempt" not in stack.log_text(), "a refused disk is not retried"
    assert disk_untouched(sim, stack.hosts("rescue")[name]["server_id"])
