"""The plan a reviewer reads: every row of the README's "What each change does", through the local engine.

Each test previews a change and asserts the plan exactly (which resources, which operation, which property
paths), then runs `up` (which previews first, as `pulumi up` does), then previews again and expects
nothing to do. Previews go through the real provider server with values not known yet exactly as the
engine sends them; `refresh` reads, then diffs what it read against the inputs, as the engine does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from dabei_firstboot.config import HOST_KEY
from dabei_firstboot.seed import list_partitions
from e2ehelpers import CREATE, DELETE, UPDATE, preview, rootfs, servers_named, step_hosts, up
from hcloud import Client

from dabei_component.component import FleetArgs
from dabei_component.demo import FIXTURE_FLAKE, SimHandle, demo_args, write_fixture_flake
from dabei_component.keys import generate_ssh_keypair
from dabei_component.localup import DYNAMIC, HCLOUD_SERVER, LocalEngine, Plan, generated_keys
from dabei_component.program import declare
from dabei_component.sim.client import ControlClient
from dabei_component.ssh import SshError, connect

pytestmark = pytest.mark.timeout(600)


def fleet(sim: SimHandle, prefix: str, count: int = 2, **host: Any) -> FleetArgs:
    args = demo_args(count, ssh_port=sim.ssh_port, prefix=prefix)
    for key, value in host.items():
        setattr(args.hosts[0], key, value)
    return args


def test_a_new_stack_previews_creates_only_then_ups_then_previews_nothing(engine: LocalEngine, sim: SimHandle) -> None:
    args = fleet(sim, "nw")
    changes = preview(engine, args, "nw")
    assert changes == {
        name: (CREATE, ())
        for name in (
            "nw",
            *("nw-keys", "nw-deploy", "nw-image", "nw-rescue", "nw-install", "nw-firstboot"),
            *("nw-nw-1", "nw-nw-1-hostkey", "nw-nw-1-server", "nw-1-uname"),
            *("nw-nw-2", "nw-nw-2-hostkey", "nw-nw-2-server", "nw-2-uname"),
        )
    }
    assert servers_named(sim, "nw-") == [], "a preview creates nothing"
    outputs = up(engine, args, "nw")
    assert all(h["system"] for h in outputs["hosts"].values())
    # The command chained on each host ran over SSH with the pinned host key.
    assert "Linux" in engine.state["command:remote:Command::nw-1-uname"].outputs["stdout"]
    assert preview(engine, args, "nw") == {}


def test_adding_a_host_previews_only_that_host_and_the_step_updates(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "ad"), "ad")
    keys_before = generated_keys(engine.state, "ad")
    bigger = fleet(sim, "ad", 3)
    # The plan's values as `pulumi preview --diff` shows them: a secret's never.
    text = engine.preview(lambda: declare(bigger, name="ad")).render()
    assert "host_private_keys.ad-3: [secret] => [secret]" in text and "PRIVATE KEY" not in text
    assert preview(engine, bigger, "ad") == {
        "ad-ad-3": (CREATE, ()),
        "ad-ad-3-hostkey": (CREATE, ()),
        "ad-ad-3-server": (CREATE, ()),
        "ad-3-uname": (CREATE, ()),
        "ad-rescue": (UPDATE, ("hosts.ad-3",)),
        "ad-install": (UPDATE, ("host_private_keys.ad-3", "hosts.ad-3", "rescued")),
        "ad-firstboot": (UPDATE, ("hosts.ad-3", "installed")),
    }
    up(engine, bigger, "ad")
    keys_after = generated_keys(engine.state, "ad")
    assert keys_after["deploy_private_key"] == keys_before["deploy_private_key"]
    for name in ("ad-1", "ad-2"):
        assert keys_after["host_private_keys"][name] == keys_before["host_private_keys"][name]
    assert engine.operations[f"{HCLOUD_SERVER}::ad-ad-1-server"] == "same"
    assert preview(engine, bigger, "ad") == {}


def test_a_removed_host_previews_its_deletion_and_up_deletes_its_server(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "rm"), "rm")
    smaller = fleet(sim, "rm", 1)
    assert preview(engine, smaller, "rm") == {
        "rm-rm-2": (DELETE, ()),
        "rm-rm-2-hostkey": (DELETE, ()),
        "rm-rm-2-server": (DELETE, ()),
        "rm-2-uname": (DELETE, ()),
        "rm-rescue": (UPDATE, ("hosts.rm-2",)),
        "rm-install": (UPDATE, ("host_private_keys.rm-2", "hosts.rm-2", "rescued")),
        "rm-firstboot": (UPDATE, ("hosts.rm-2", "installed")),
    }
    up(engine, smaller, "rm")
    assert servers_named(sim, "rm-") == ["rm-1"]
    assert preview(engine, smaller, "rm") == {}


def test_a_new_flake_revision_previews_on_first_boot_only_and_applies_in_place(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    up(engine, fleet(sim, "fl"), "fl")
    before = step_hosts(engine, "fl", "firstboot")
    other = write_fixture_flake(tmp_path / "other", {"fl-1": {"system": "x86_64-linux", "motd": "other"}})
    changed = fleet(sim, "fl", flake=str(other))
    op, paths = preview(engine, changed, "fl")["fl-firstboot"]
    assert op == UPDATE and {"hosts.fl-1.flake", "hosts.fl-1.system", "rollout.batches"} <= set(paths)
    assert not any(p.startswith("hosts.fl-2") for p in paths)
    # The rollout input shows how the in-place switch will go: one batch, fl-1 alone.
    up(engine, changed, "fl")
    after = step_hosts(engine, "fl", "firstboot")
    assert after["fl-1"]["boot_id"] == before["fl-1"]["boot_id"], "applied in place, no reboot"
    assert after["fl-1"]["system"] != before["fl-1"]["system"]
    assert after["fl-2"] == before["fl-2"]
    assert preview(engine, changed, "fl") == {}


def test_labels_update_the_server_in_place(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "lb"), "lb")
    changed = fleet(sim, "lb", labels={"purpose": "demo", "tier": "web"})
    assert preview(engine, changed, "lb") == {"lb-lb-1-server": (UPDATE, ("labels.tier",))}
    up(engine, changed, "lb")
    client = Client(token=sim.token, api_endpoint=sim.endpoint)
    server = client.servers.get_by_name("lb-1")
    assert server is not None and server.labels == {"purpose": "demo", "tier": "web"}
    assert preview(engine, changed, "lb") == {}


def test_a_new_image_touches_no_installed_host(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, tmp_path: Path
) -> None:
    args = fleet(sim, "im")
    up(engine, args, "im")
    installed = step_hosts(engine, "im", "install")
    booted = step_hosts(engine, "im", "firstboot")
    # A routine `nix flake update`: the image output's store path changes.
    flake = tmp_path / "image"
    shutil.copytree(FIXTURE_FLAKE, flake)
    source = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(source.replace('payload = "nix-dabei', 'payload = "updated nix-dabei'))
    args.image.flake = f"path:{flake}"
    assert preview(engine, args, "im") == {"im-image": (UPDATE, ("flake", "out_path"))}
    up(engine, args, "im")
    assert step_hosts(engine, "im", "install") == installed
    assert step_hosts(engine, "im", "firstboot") == booted
    assert preview(engine, args, "im") == {}
    # A host added later is installed from the new image.
    bigger = fleet(sim, "im", 3)
    bigger.image = args.image
    up(engine, bigger, "im")
    new_image = engine.state[f"{DYNAMIC}::im-image"].outputs["out_path"]
    assert step_hosts(engine, "im", "install")["im-3"]["installed_image"] == new_image
    assert step_hosts(engine, "im", "install")["im-1"]["installed_image"] != new_image


def test_a_reinstall_request_reinstalls_exactly_that_host(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "ri"), "ri")
    before = step_hosts(engine, "ri", "firstboot")
    request = fleet(sim, "ri", reinstall="2026-12-01")
    assert preview(engine, request, "ri") == {
        "ri-rescue": (UPDATE, ("hosts.ri-1.reinstall",)),
        "ri-install": (UPDATE, ("hosts.ri-1.reinstall", "rescued")),
        "ri-firstboot": (UPDATE, ("hosts.ri-1.reinstall", "installed")),
    }
    up(engine, request, "ri")
    after = step_hosts(engine, "ri", "firstboot")
    assert after["ri-1"]["boot_id"] != before["ri-1"]["boot_id"]
    assert after["ri-2"] == before["ri-2"]
    assert preview(engine, request, "ri") == {}
    # Taking the request out again is no new request, and neither is putting it back (a reverted pull
    # request): only an ID the host was never given wipes it.
    assert preview(engine, fleet(sim, "ri"), "ri") == {}
    up(engine, fleet(sim, "ri"), "ri")
    assert preview(engine, request, "ri") == {}


def test_a_new_server_type_resizes_in_place_keeps_the_disk_and_grows_the_pool(
    engine: LocalEngine, sim: SimHandle, control: ControlClient
) -> None:
    up(engine, fleet(sim, "rs", 1), "rs")
    before = step_hosts(engine, "rs", "firstboot")["rs-1"]
    disk = Path(control.server(before["server_id"])["machine"]["disk_path"])
    zfs_before = next(p for p in list_partitions(disk) if p["name"] == "zfs")
    # What the image wrote there (the rest of the 40 GB partition is empty space of the sparse disk).
    data_before = _digest(disk, zfs_before["offset"], 64 * 1024**2)

    bigger = fleet(sim, "rs", 1, server_type="cx32")
    assert preview(engine, bigger, "rs") == {"rs-rs-1-server": (UPDATE, ("serverType",))}
    up(engine, bigger, "rs")

    server = Client(token=sim.token, api_endpoint=sim.endpoint).servers.get_by_name("rs-1")
    assert server is not None and server.server_type is not None and server.server_type.name == "cx32"
    assert disk.stat().st_size == 80 * 1024**3, "pulumi-hcloud upgrades the disk unless keepDisk"
    # The same installation on the bigger disk (nothing rewritten), its partition grown to the disk's end.
    zfs_after = next(p for p in list_partitions(disk) if p["name"] == "zfs")
    assert zfs_after["first_lba"] == zfs_before["first_lba"]
    assert zfs_after["last_lba"] == disk.stat().st_size // 512 - 34
    assert _digest(disk, zfs_before["offset"], 64 * 1024**2) == data_before
    # The host came back with its key and its system: a refresh finds no drift, the steps did nothing.
    assert engine.refresh().changes() == {}
    after = step_hosts(engine, "rs", "firstboot")["rs-1"]
    assert after["boot_id"] != before["boot_id"] and after["system"] == before["system"]
    assert preview(engine, bigger, "rs") == {}


def test_new_ssh_keys_are_set_on_the_running_host_in_place(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "sk", 1), "sk")
    host = step_hosts(engine, "sk", "firstboot")["sk-1"]
    laptop = generate_ssh_keypair()

    def logs_in() -> bool:
        async def attempt() -> bool:
            loop = asyncio.get_running_loop()
            try:
                conn, _ = await connect(
                    host["ipv4"], port=sim.ssh_port, client_key=laptop.private_openssh,
                    host_key=host["host_public_key"], deadline=loop.time() + 5,
                )  # fmt: skip
            except SshError:
                return False
            conn.close()
            return True

        return asyncio.run(attempt())

    assert not logs_in()
    with_key = fleet(sim, "sk", 1, ssh_keys=[laptop.public])
    changes = preview(engine, with_key, "sk")
    uploads = [n for n in changes if n.startswith("sk-key-")]
    assert [changes.pop(n) for n in uploads] == [(CREATE, ())], "the pasted key goes to the project once"
    assert changes == {"sk-firstboot": (UPDATE, ("hosts.sk-1.authorized_keys",))}
    up(engine, with_key, "sk")
    assert logs_in()
    assert step_hosts(engine, "sk", "firstboot")["sk-1"]["boot_id"] == host["boot_id"], "set in place"
    assert preview(engine, with_key, "sk") == {}

    without = fleet(sim, "sk", 1)
    assert preview(engine, without, "sk")["sk-firstboot"] == (UPDATE, ("hosts.sk-1.authorized_keys",))
    up(engine, without, "sk")
    assert not logs_in()


def test_a_new_location_replaces_the_server_and_installs_the_new_one(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "lc", 1), "lc")
    before = step_hosts(engine, "lc", "firstboot")["lc-1"]
    moved = fleet(sim, "lc", 1, location="hel1")
    changes = preview(engine, moved, "lc")
    assert changes["lc-lc-1-server"] == ("replace", ("location",))
    # The new server's ID is not known yet: every step shows that host acting.
    for step in ("lc-rescue", "lc-install", "lc-firstboot"):
        assert changes[step][0] == UPDATE and any(p.startswith("hosts.lc-1.") for p in changes[step][1]), step
    up(engine, moved, "lc")
    after = step_hosts(engine, "lc", "firstboot")["lc-1"]
    assert after["server_id"] != before["server_id"] and after["system"]
    server = Client(token=sim.token, api_endpoint=sim.endpoint).servers.get_by_name("lc-1")
    assert server is not None and server.location is not None and server.location.name == "hel1"
    assert preview(engine, moved, "lc") == {}


def _digest(disk: Path, offset: int, size: int) -> str:
    with open(disk, "rb") as handle:
        handle.seek(offset)
        return hashlib.sha256(handle.read(size)).hexdigest()


def _break(control: ControlClient, server_id: Any, how: str) -> None:
    """Change a converged host behind the component's back."""
    root = rootfs(control, server_id)
    status = root / "var/lib/nix-dabei/status.json"
    if how == "failed":
        doc = json.loads(status.read_text())
        status.write_text(json.dumps({**doc, "phase": "failed", "last_error": "someone broke it"}))
    elif how == "system":
        current = root / "run/current-system"
        current.unlink()
        current.symlink_to("/nix/store/00000000000000000000000000000000-nixos-system-by-hand")


@pytest.mark.parametrize("how", ["failed", "system"])
def test_refresh_shows_drift_and_the_next_up_repairs_it(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, how: str
) -> None:
    name = {"failed": "dfail", "system": "dsys"}[how]
    args = fleet(sim, name)
    up(engine, args, name)
    host = f"{name}-1"
    server_id = step_hosts(engine, name, "firstboot")[host]["server_id"]
    _break(control, server_id, how)

    refreshed = engine.refresh()
    print(refreshed.render())
    op, paths = refreshed.changes()[f"{name}-firstboot"]
    assert op == UPDATE and f"hosts.{host}.drift" in paths
    assert set(refreshed.changes()) == {f"{name}-firstboot"}
    drift = step_hosts(engine, name, "firstboot")[host]["drift"]
    assert ("phase is 'failed'" in drift) if how == "failed" else ("nixos-system-by-hand" in drift)

    # The next preview shows the repair; `up` re-converges the host in place; then nothing is left to do.
    assert preview(engine, args, name) == {f"{name}-firstboot": (UPDATE, (f"hosts.{host}.drift",))}
    up(engine, args, name)
    repaired = step_hosts(engine, name, "firstboot")[host]
    assert repaired.get("drift") is None and "by-hand" not in repaired["system"]
    assert engine.refresh().changes() == {}
    assert preview(engine, args, name) == {}


def test_refresh_of_a_host_with_another_key_shows_drift_and_up_refuses_it(
    engine: LocalEngine, sim: SimHandle, control: ControlClient
) -> None:
    args = fleet(sim, "dk", 1)
    up(engine, args, "dk")
    server_id = step_hosts(engine, "dk", "firstboot")["dk-1"]["server_id"]
    # Reinstalled behind the component's back: the host presents another key from its next boot on.
    key = rootfs(control, server_id) / HOST_KEY
    key.write_text(generate_ssh_keypair().private_openssh)
    Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2).servers.reboot(
        Client(token=sim.token, api_endpoint=sim.endpoint).servers.get_by_id(int(server_id))
    ).wait_until_finished()

    assert engine.refresh().changes()["dk-firstboot"][0] == UPDATE
    assert "another host key" in step_hosts(engine, "dk", "firstboot")["dk-1"]["drift"]
    with pytest.raises(Exception, match=r"dk-1.*refusing the host"):
        engine.up(lambda: declare(args, name="dk"), skip_preview=True)


def test_destroy_deletes_every_resource_dependents_first(engine: LocalEngine, sim: SimHandle) -> None:
    up(engine, fleet(sim, "de"), "de")
    plan: Plan = engine.destroy()
    deleted = [c.name for c in plan if c.op == DELETE]
    assert set(deleted) == {k.split("::", 1)[1] for k in engine.operations}
    assert engine.state == {}
    assert servers_named(sim, "de-") == []
    # A command goes before the first boot it depends on, the servers before the deploy key they carry.
    assert deleted.index("de-1-uname") < deleted.index("de-firstboot")
    assert deleted.index("de-de-1-server") < deleted.index("de-deploy")


def test_the_demo_preview_prints_the_plan_of_a_new_stack(engine: LocalEngine, sim: SimHandle) -> None:
    plan = engine.preview(lambda: declare(fleet(sim, "pp", 1), name="pp"))
    text = plan.render()
    assert "+ pulumi-python:dynamic:Resource pp-rescue" in text
    assert text.endswith("Resources: 11 to create, 0 unchanged")
