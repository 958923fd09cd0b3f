"""The component in a larger Hetzner project: pulumi-hcloud server settings passed through, an IPv6-only
host next to a dual-stack one, servers made elsewhere, and secrets encrypted to a host before it exists.

Each test previews and asserts the plan, runs `up` through the local engine (the real provider server,
the simulator's real sshd and first-boot program), then previews again and expects nothing to do.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pulumi_hcloud as hcloud
import pytest
from dabei_firstboot.config import HOST_KEY
from hcloud import APIException, Client
from hcloud.locations import Location
from hcloud.networks import NetworkSubnet
from hcloud.server_types import ServerType
from pulumi.runtime import rpc

from dabei_component.component import FleetArgs, HostArgs
from dabei_component.demo import SimHandle, demo_args, demo_flake
from dabei_component.localup import HCLOUD_SERVER, LocalEngine, UpFailed, generated_keys
from dabei_component.program import declare, fleet_args_from_config
from dabei_component.provider_server import ProviderServer
from dabei_component.rollout import HealthCheck
from dabei_component.sim.client import ControlClient
from dabei_component.ssh import connect, run

pytestmark = pytest.mark.timeout(600)

CREATE, UPDATE = "create", "update"


def client(sim: SimHandle) -> Client:
    return Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)


def up(engine: LocalEngine, program: Any) -> dict[str, Any]:
    outputs = engine.up(program)
    assert engine.last_plan.changes().keys() == engine.last_preview.changes().keys()
    return outputs


# A real hosts' flake defining every host of these tests (the deployer evaluates each host's system).
FLAKE = demo_flake(dict.fromkeys(("cs-1", "cs-2", "ex-1", "er-1", "ea-1", "bad-1", "nm-1"), "x86_64-linux"))


def with_hosts(sim: SimHandle, hosts: list[HostArgs]) -> FleetArgs:
    args = demo_args(1, ssh_port=sim.ssh_port)
    args.hosts = hosts
    return args


def host(name: str, **settings: Any) -> HostArgs:
    return HostArgs(name=name, flake=FLAKE, **{"server_type": "cx22", "location": "fsn1", **settings})


async def _on_host(address: str, port: int, deploy_key: str, host_key: str, script: str) -> str:
    loop = asyncio.get_running_loop()
    conn, _ = await connect(address, port=port, client_key=deploy_key, host_key=host_key, deadline=loop.time() + 30)
    async with conn:
        return (await run(conn, script, timeout=60)).stdout


def test_server_settings_pass_through_and_an_ipv6_only_host_converges(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, provider: ProviderServer, tmp_path: Path
) -> None:
    api = client(sim)
    network = api.networks.create(
        name="cs-net",
        ip_range="10.0.0.0/16",
        subnets=[NetworkSubnet(type="cloud", ip_range="10.0.1.0/24", network_zone="eu-central")],
    ).id
    group = api.placement_groups.create(name="cs-spread", type="spread").placement_group.id
    primary = api.primary_ips.create(type="ipv4", name="cs-ipv4", location=Location(name="fsn1")).primary_ip
    # The dual-stack host as stack config (pulumi-hcloud's camelCase names), the IPv6-only one typed.
    base = demo_args(1, ssh_port=sim.ssh_port)
    config_host = {
        "name": "cs-1",
        "serverType": "cx22",
        "location": "fsn1",
        "flake": FLAKE,
        "networks": [{"networkId": network, "ip": "10.0.1.5", "aliasIps": ["10.0.1.6"]}],
        "placementGroupId": str(group),
        "deleteProtection": True,
        "rebuildProtection": "true",
        "backups": True,
        "publicNets": [{"ipv4": primary.id}],
    }
    image = {"flake": base.image.flake, "attr": base.image.attr, "nixArgs": base.image.nix_args}
    args = fleet_args_from_config(image, [config_host], {"rescue": 300, "install": 600}, sim.ssh_port)
    args.hosts.append(host("cs-2", public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=False, ipv6_enabled=True)]))

    def program() -> Any:
        return declare(args, name="cs")

    assert engine.preview(program).changes() == {
        name: (CREATE, ())
        for name in (
            *("cs", "cs-keys", "cs-deploy", "cs-image", "cs-rescue", "cs-install", "cs-firstboot"),
            *("cs-cs-1", "cs-cs-1-hostkey", "cs-cs-1-server", "cs-1-uname"),
            *("cs-cs-2", "cs-cs-2-hostkey", "cs-cs-2-server", "cs-2-uname"),
        )
    }
    outputs = up(engine, program)
    assert all(h["system"] for h in outputs["hosts"].values())

    # The simulator shows what pulumi-hcloud was given.
    one = control.server(engine.state[f"{HCLOUD_SERVER}::cs-cs-1-server"].id)
    assert one["private_net"][0] | {"mac_address": None} == {
        "network": network, "ip": "10.0.1.5", "alias_ips": ["10.0.1.6"], "mac_address": None,
    }  # fmt: skip
    assert one["placement_group_id"] == group
    assert one["protection"] == {"delete": True, "rebuild": True}
    assert one["backup_window"]
    assert one["ipv4"] == primary.ip and api.primary_ips.get_by_id(primary.id).assignee_id == one["id"]
    two = control.server(engine.state[f"{HCLOUD_SERVER}::cs-cs-2-server"].id)
    assert two["ipv4"] is None and two["machine"]["ipv4"] is None

    # The IPv6-only host: no invented IPv4, every step and the chained command went over IPv6.
    hosts = outputs["hosts"]
    assert hosts["cs-2"]["ipv4"] is None
    assert hosts["cs-2"]["ipv6"] == two["ipv6_address"]
    assert hosts["cs-2"]["known_hosts"].startswith(f"[{two['ipv6_address']}]:{sim.ssh_port} ssh-ed25519 ")
    assert hosts["cs-1"]["ipv4"] == one["ipv4"]
    assert "Linux" in engine.state["command:remote:Command::cs-2-uname"].outputs["stdout"]
    connection = rpc.unwrap_rpc_secret(engine.state["command:remote:Command::cs-2-uname"].inputs["connection"])
    assert rpc.unwrap_rpc_secret(connection["host"]) == two["ipv6_address"]
    # The relay runs between IPv4 addresses: the IPv6-only host was written directly, in the same call.
    log = provider.log_path.read_text()
    assert "[cs-2] install: IPv6-only host: not in the relay" in log
    assert re.search(r"\[cs-2\] install: writing the image to /dev/sda \(.*\), streamed directly", log)
    assert "[cs-1] install: write attempt 1 failed" not in log
    instance = (Path(two["machine"]["rootfs"]) / "var/lib/nix-dabei/instance-data.json").read_text()
    assert '"public_ipv4": null' in instance and '"ipv4_dhcp": false' in instance

    assert engine.preview(program).changes() == {}
    assert engine.refresh().changes() == {}

    # Secrets before the host existed: encrypted with the real `age` to the exported recipients (what a
    # repository commits), decrypted on the host with the key its seed installed.
    keys = generated_keys(engine.state, "cs")
    recipients = hosts["cs-2"]["recipients"]
    assert recipients["ssh"] == " ".join(keys["host_public_keys"]["cs-2"].split()[:2])
    sealed = {
        "agenix": ["-r", recipients["ssh"]],  # age's own ssh-ed25519 recipient type
        "sops": ["-r", recipients["age"]],  # X25519, as sops-nix takes it
    }
    rootfs = Path(two["machine"]["rootfs"])
    for kind, recipient in sealed.items():
        secret = subprocess.run(
            ["age", *recipient], input=f"{kind}-secret".encode(), capture_output=True, check=True
        ).stdout
        (rootfs / f"{kind}.age").write_bytes(secret)
    host_key = rootfs / HOST_KEY
    # agenix decrypts with the SSH host key itself; sops-nix converts it to an X25519 identity first
    # (`sops.age.sshKeyPaths`), as `age-identity` does.
    script = (
        f"age -d -i {host_key} {rootfs}/agenix.age; echo; "
        f"{sys.executable} -m dabei_component.recipients age-identity < {host_key} "
        f"| age -d -i - {rootfs}/sops.age"
    )
    out = asyncio.run(
        _on_host(
            two["ipv6_address"], sim.ssh_port, keys["deploy_private_key"], keys["host_public_keys"]["cs-2"], script
        )
    )
    assert out.split() == ["agenix-secret", "sops-secret"]

    # The stand-in sets networks only at creation: a later change is refused, not silently dropped.
    attached = args.hosts[0].networks
    args.hosts[0].networks = [hcloud.ServerNetworkArgs(network_id=network, ip="10.0.1.7")]
    assert engine.preview(program).changes() == {"cs-cs-1-server": (UPDATE, ("networks[0].aliasIps", "networks[0].ip"))}
    with pytest.raises(UpFailed, match=r"sets \['networks'\] only at creation"):
        engine.up(program)
    args.hosts[0].networks = attached
    assert engine.preview(program).changes() == {}

    # Delete protection holds until the settings say otherwise, as with pulumi-hcloud.
    with pytest.raises(APIException, match="protected"):
        api.servers.get_by_id(one["id"]).delete()
    args.hosts[0].delete_protection = args.hosts[0].rebuild_protection = False
    assert engine.preview(program).changes() == {
        "cs-cs-1-server": (UPDATE, ("deleteProtection", "rebuildProtection")),
    }
    up(engine, program)
    assert control.server(one["id"])["protection"] == {"delete": False, "rebuild": False}
    engine.destroy()
    assert not [s for s in api.servers.get_all() if s.name.startswith("cs-")]
    kept = api.primary_ips.get_by_id(primary.id)
    assert kept.ip == primary.ip and kept.assignee_id is None, "a primary IP outlives its server"


def test_an_ipv6_only_host_switches_in_place_with_health_checks_on_its_ipv6_address(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, provider: ProviderServer
) -> None:
    args = with_hosts(sim, [host("v6-1", public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=False)])])
    args.hosts[0].flake = demo_flake({"v6-1": {"system": "x86_64-linux", "motd": "one"}})
    outputs = up(engine, lambda: declare(args, name="v6"))
    machine = control.server(engine.state[f"{HCLOUD_SERVER}::v6-v6-1-server"].id)["machine"]
    assert outputs["hosts"]["v6-1"]["ipv4"] is None and machine["app_port"]
    port = machine["app_port"]
    args.health_checks = [
        HealthCheck(name="cmd", command="true"),
        HealthCheck(name="port", tcp=port),
        HealthCheck(name="web", http=f"http://{{host}}:{port}/"),
    ]
    args.hosts[0].flake = demo_flake({"v6-1": {"system": "x86_64-linux", "motd": "two"}})
    after = up(engine, lambda: declare(args, name="v6"))
    assert after["hosts"]["v6-1"]["system"] != outputs["hosts"]["v6-1"]["system"]
    log = provider.log_path.read_text()
    for name in ("cmd", "port", "web"):
        assert f"health check {name!r} passed" in log
    assert "switch confirmed" in log


def test_an_existing_server_by_id_is_installed_and_survives_destroy(engine: LocalEngine, sim: SimHandle) -> None:
    api = client(sim)
    made = api.servers.create(
        name="ex-1", server_type=ServerType(name="cx22"), image=api.images.get_by_name("debian-12"),
        location=Location(name="nbg1"),
    )  # fmt: skip
    made.action.wait_until_finished()
    args = with_hosts(sim, [HostArgs(name="ex-1", flake=FLAKE, existing_server=made.server.id)])

    def program() -> Any:
        return declare(args, name="ex")

    assert engine.preview(program).changes() == {
        name: (CREATE, ())
        for name in (
            *("ex", "ex-keys", "ex-deploy", "ex-image", "ex-rescue", "ex-install", "ex-firstboot"),
            *("ex-ex-1", "ex-ex-1-hostkey", "ex-1-uname"),
        )
    }
    outputs = up(engine, program)
    assert outputs["hosts"]["ex-1"]["system"]
    assert outputs["hosts"]["ex-1"]["ipv4"] == api.servers.get_by_id(made.server.id).public_net.ipv4.ip
    assert engine.preview(program).changes() == {}
    engine.destroy()
    assert api.servers.get_by_id(made.server.id).status == "running", "the component never deletes it"


def test_a_server_resource_of_the_program_is_installed_and_outlives_the_fleet(
    engine: LocalEngine, sim: SimHandle
) -> None:
    api = client(sim)
    keep_fleet = True

    def program() -> Any:
        server = hcloud.Server("er-1", name="er-1", server_type="cx22", location="hel1", image="debian-12")
        if not keep_fleet:
            return {"server": server.id}
        args = with_hosts(sim, [HostArgs(name="er-1", flake=FLAKE, existing_server=server)])
        return declare(args, name="er")

    changes = engine.preview(program).changes()
    assert changes["er-1"] == (CREATE, ()) and "er-er-1-server" not in changes
    up(engine, program)
    server_id = int(engine.state[f"{HCLOUD_SERVER}::er-1"].id)
    keep_fleet = False
    up(engine, program)  # the fleet is gone from the program: its resources are deleted, the server stays
    assert engine.state[f"{HCLOUD_SERVER}::er-1"].id == str(server_id)
    assert api.servers.get_by_id(server_id).status == "running"
    engine.destroy()


def test_an_arm_server_resource_is_refused_before_its_disk_is_touched(engine: LocalEngine, sim: SimHandle) -> None:
    """A server given as a resource has no server type the program can read: it gets the x86_64 image, and
    the rescue step refuses it by the API's architecture before rescue, so nothing is written."""
    api = client(sim)

    def program() -> Any:
        server = hcloud.Server("ea-1", name="ea-1", server_type="cax11", location="hel1", image="debian-12")
        return declare(with_hosts(sim, [HostArgs(name="ea-1", flake=FLAKE, existing_server=server)]), name="ea")

    with pytest.raises(UpFailed) as refused:
        engine.up(program)
    text = str(refused.value)
    assert "is a cax11 (arm, aarch64-linux), but its image is for x86_64-linux: refused before anything" in text
    made = api.servers.get_by_name("ea-1")
    assert made is not None and made.status == "running" and not made.rescue_enabled
    engine.destroy()


@pytest.mark.parametrize(
    ("host_config", "key", "reason"),
    [
        ({"userData": "#cloud-config"}, "hosts[0].userData", "not settable on a nix-dabei host"),
        ({"image": "debian-12"}, "hosts[0].image", "writes the NixOS image"),
        ({"rescue": "linux64"}, "hosts[0].rescue", "boots the rescue system itself"),
        ({"deleteProtection": True, "rebuildProtection": False}, "hosts[0].rebuildProtection", "must equal"),
        ({"deleteProtection": True}, "hosts[0].rebuildProtection", "must be set to true as well"),
        ({"rebuildProtection": "true"}, "hosts[0].deleteProtection", "must be set to true as well"),
        ({"publicNets": [{"ipv4Enabled": False, "ipv6Enabled": False}]}, "hosts[0].publicNets[0]", "both off"),
        ({"publicNets": [{"ipv4Enabled": False, "ipv4": 5}]}, "hosts[0].publicNets[0].ipv4", "ipv4_enabled is"),
        ({"networks": [{"ip": "10.0.1.5"}]}, "hosts[0].networks[0]", "needs network_id"),
        ({"networks": [{"networkId": 1, "ip": "fd00::5"}]}, "hosts[0].networks[0].ip", "private IPv4"),
        ({"placementGroupId": 0}, "hosts[0].placementGroupId", "placement group ID"),
        ({"backups": "yes"}, "hosts[0].backups", "true or false"),
        ({"existingServer": 7, "labels": {"a": "b"}}, "hosts[0].labels", "set on the existing server itself"),
    ],
)
def test_bad_server_settings_are_refused_at_preview_naming_the_config_key(
    engine: LocalEngine, sim: SimHandle, host_config: dict[str, Any], key: str, reason: str
) -> None:
    base = demo_args(1, ssh_port=sim.ssh_port)
    entry = {"name": "bad-1", "flake": FLAKE, "serverType": "cx22", "location": "fsn1", **host_config}
    if "existingServer" in entry:
        del entry["serverType"], entry["location"]
    image = {"flake": base.image.flake, "attr": base.image.attr, "nixArgs": base.image.nix_args}

    def program() -> Any:
        return declare(fleet_args_from_config(image, [entry], ssh_port=sim.ssh_port), name="bad")

    with pytest.raises(Exception, match=r"nix-dabei:" + key.replace("[", r"\[").replace("]", r"\]")) as caught:
        engine.preview(program)
    assert reason in str(caught.value)
    assert not engine.state


def test_an_existing_server_with_another_name_is_refused(engine: LocalEngine, sim: SimHandle) -> None:
    api = client(sim)
    made = api.servers.create(
        name="other-name", server_type=ServerType(name="cx22"), image=api.images.get_by_name("debian-12"),
        location=Location(name="fsn1"),
    )  # fmt: skip
    made.action.wait_until_finished()
    image = {"flake": FLAKE, "attr": demo_args(1).image.attr, "nixArgs": demo_args(1).image.nix_args}
    config = [{"name": "nm-1", "flake": FLAKE, "existingServer": made.server.id}]
    args = fleet_args_from_config(image, config, None, sim.ssh_port)
    with pytest.raises(UpFailed) as refused:
        engine.preview(lambda: declare(args, name="nm"))
    text = str(refused.value)
    assert f"nix-dabei:hosts[0].existingServer: server {made.server.id} is named 'other-name', not 'nm-1'" in text
    assert "While processing input" not in text, "named by the config key, not inside an output's apply"
    config[0]["existingServer"] = 999999
    with pytest.raises(UpFailed) as missing:
        engine.preview(lambda: declare(fleet_args_from_config(image, config, None, sim.ssh_port), name="nm"))
    assert "nix-dabei:hosts[0].existingServer: cannot read the server:" in str(missing.value)
    assert "not_found" in str(missing.value)
    api.servers.get_by_id(made.server.id).delete()
