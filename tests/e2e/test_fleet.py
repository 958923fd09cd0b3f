"""End to end: the real components, the real provider server, the simulator with real sshd, zstd and dd.

One module-wide simulator; each test runs `up` through the local engine (see dabei_component/localup.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from dabei_component.demo import SimHandle, demo_args
from dabei_component.keys import public_key_of
from dabei_component.localup import HCLOUD_SERVER, LocalEngine, Recorded, UpFailed, generated_keys
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer
from dabei_component.sim.client import ControlClient
from dabei_component.ssh import connect, run

pytestmark = pytest.mark.timeout(900)


def up(engine: LocalEngine, args: Any, fleet: str) -> dict[str, Any]:
    return engine.up(lambda: declare(args, name=fleet))


def dynamic_state(engine: LocalEngine, name: str) -> Any:
    return engine.state[f"pulumi-python:dynamic:Resource::{name}"]


async def host_status(ipv4: str, port: int, deploy_key: str, host_key: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    conn, _ = await connect(ipv4, port=port, client_key=deploy_key, host_key=host_key, deadline=loop.time() + 30)
    async with conn:
        done = await run(conn, "nix-dabei status", timeout=30)
    return json.loads(done.stdout)


def secrets_of(engine: LocalEngine, sim: SimHandle, fleet: str) -> list[str]:
    keys = generated_keys(engine.state, fleet)
    found = [sim.token, keys["deploy_private_key"], *keys["host_private_keys"].values()]
    # Also the base64 body of each private key, in case something printed it without its armour.
    found += [line for k in found[1:] for line in k.splitlines() if len(line) > 40]
    return found


def test_three_servers_install_and_converge(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, provider: ProviderServer
) -> None:
    args = demo_args(3, flake="github:example/infra?rev=1", ssh_port=sim.ssh_port, prefix="three")
    outputs = up(engine, args, "f3")

    keys = generated_keys(engine.state, "f3")
    assert sorted(outputs["hosts"]) == ["three-1", "three-2", "three-3"]
    for name, host in outputs["hosts"].items():
        assert re.fullmatch(rf"/nix/store/[a-z0-9]{{32}}-nixos-system-{name}", host["system"]), host
        public = keys["host_public_keys"][name]
        assert public == public_key_of(keys["host_private_keys"][name])
        assert host["known_hosts"] == f"[{host['ipv4']}]:{sim.ssh_port} {public}"
        # Independently of the component: the host answers with its generated key and says converged.
        status = asyncio.run(host_status(host["ipv4"], sim.ssh_port, keys["deploy_private_key"], public))
        assert status["status"]["phase"] == "converged"
        assert status["status"]["flake"] == "github:example/infra?rev=1"
        assert status["system"] == host["system"]

    # Rescue was left behind, the disk holds a GPT whose seed was consumed by the first boot.
    firstboot = dynamic_state(engine, "f3-firstboot").outputs["hosts"]
    install = dynamic_state(engine, "f3-install").outputs["hosts"]
    for name in outputs["hosts"]:
        assert firstboot[name]["boot_id"] != install[name]["rescue_boot_id"]
        server = control.server(install[name]["server_id"])
        assert server["machine"]["mode"] == "disk"

    log = (provider.log_path).read_text()
    assert "install: " in log and "converged on /nix/store/" in log
    # The image was built, compressed and hashed once for the three hosts.
    assert log.count("image: building") == 1
    # No secret in the provider's output, nor in any non-secret output of any resource.
    plain_state = json.dumps({k: r.plain_outputs() for k, r in engine.state.items()})
    for secret in secrets_of(engine, sim, "f3"):
        assert secret not in log
        assert secret not in plain_state


def test_flake_revision_applies_in_place(engine: LocalEngine, sim: SimHandle, control: ControlClient) -> None:
    def args(rev: int) -> Any:
        return demo_args(1, flake=f"github:example/infra?rev={rev}", ssh_port=sim.ssh_port, prefix="upd")

    up(engine, args(1), "fu")
    before = dynamic_state(engine, "fu-firstboot").outputs["hosts"]["upd-1"]
    install_before = dynamic_state(engine, "fu-install").outputs["hosts"]["upd-1"]

    outputs = up(engine, args(2), "fu")

    ops = engine.operations
    assert ops["pulumi-python:dynamic:Resource::fu-firstboot"] == "updated"
    assert ops["pulumi-python:dynamic:Resource::fu-install"] == "same"
    assert ops["pulumi-python:dynamic:Resource::fu-rescue"] == "same"
    assert ops["hcloud:index/server:Server::fu-upd-1-server"] == "same"
    after = dynamic_state(engine, "fu-firstboot").outputs["hosts"]["upd-1"]
    assert after["flake"] == "github:example/infra?rev=2"
    assert after["boot_id"] == before["boot_id"], "an in-place apply must not reboot"
    assert after["system"] != before["system"]
    assert outputs["hosts"]["upd-1"]["system"] == after["system"]
    assert dynamic_state(engine, "fu-install").outputs["hosts"]["upd-1"] == install_before
    rootfs = Path(control.server(before["server_id"])["machine"]["rootfs"])
    rebuilds = (rootfs / "var/lib/nix-dabei-sim/rebuilds.log").read_text()
    assert rebuilds.splitlines() == ["github:example/infra?rev=1", "github:example/infra?rev=2"]

    # A third run with nothing changed does nothing.
    up(engine, args(2), "fu")
    assert set(engine.operations.values()) == {"same"}


def test_failing_first_boot_is_reported_with_journal(
    engine: LocalEngine, sim: SimHandle, control: ControlClient
) -> None:
    args = demo_args(1, ssh_port=sim.ssh_port, prefix="broken")
    args.deadlines.firstboot = 120

    # Make every rebuild on that host fail, before it ever boots from disk.
    def break_rebuilds(key: str, rec: Recorded, _op: str) -> None:
        if key.startswith(HCLOUD_SERVER):
            rootfs = Path(control.server(rec.id)["machine"]["rootfs"])
            (rootfs / "var/lib/nix-dabei-sim").mkdir(parents=True, exist_ok=True)
            (rootfs / "var/lib/nix-dabei-sim/fail-rebuilds").write_text("always\n")

    engine.listeners.append(break_rebuilds)
    with pytest.raises(UpFailed) as failed:
        up(engine, args, "fb")
    text = str(failed.value)
    assert "broken-1" in text
    assert "first boot failed in phase 'failed'" in text or "phase 'rebuild'" in text
    assert "journal tail" in text
