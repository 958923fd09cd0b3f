"""Networks, placement groups, primary IPs and the server settings that use them, through the `hcloud`
library; every response is checked against the OpenAPI document (the `sim` fixture)."""

from __future__ import annotations

import hcloud
import pytest
from hcloud import APIException
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.networks import NetworkSubnet
from hcloud.placement_groups import PlacementGroup
from hcloud.primary_ips import PrimaryIP
from hcloud.server_types import ServerType
from hcloud.servers import ServerCreatePublicNetwork

from dabei_component.sim import Simulator
from dabei_component.sim.client import ControlClient


def _create(client: hcloud.Client, name: str, **kwargs: object) -> object:
    created = client.servers.create(
        name=name, server_type=ServerType(name="cx22"), image=Image(name="debian-12"), **kwargs
    )
    for action in [created.action, *(created.next_actions or [])]:
        action.wait_until_finished()
    return client.servers.get_by_id(created.server.id)


def test_server_settings_show_in_the_api_and_the_control_view(sim: Simulator, client: hcloud.Client) -> None:
    net = client.networks.create(
        name="net", ip_range="10.0.0.0/16", subnets=[NetworkSubnet(type="cloud", ip_range="10.0.1.0/24",
                                                                  network_zone="eu-central")],
    )  # fmt: skip
    group = client.placement_groups.create(name="spread", type="spread").placement_group
    primary = client.primary_ips.create(type="ipv4", name="v4", location=Location(name="fsn1")).primary_ip
    server = _create(
        client, "web-1", location=Location(name="fsn1"), placement_group=PlacementGroup(id=group.id),
        public_net=ServerCreatePublicNetwork(ipv4=PrimaryIP(id=primary.id), enable_ipv6=False),
    )  # fmt: skip
    server.attach_to_network(net, ip="10.0.1.5", alias_ips=["10.0.1.6"]).wait_until_finished()
    server.change_protection(delete=True, rebuild=True).wait_until_finished()
    server.enable_backup().wait_until_finished()

    seen = client.servers.get_by_id(server.id)
    assert seen.public_net.ipv4.ip == primary.ip and seen.public_net.ipv6 is None
    assert seen.placement_group.id == group.id
    assert [(p.network.id, p.ip, p.alias_ips) for p in seen.private_net] == [(net.id, "10.0.1.5", ["10.0.1.6"])]
    assert seen.protection == {"delete": True, "rebuild": True} and seen.backup_window
    assert client.placement_groups.get_by_id(group.id).servers == [server.id]
    assert client.networks.get_by_id(net.id).servers[0].id == server.id
    control = ControlClient(sim.control_url, sim.token).server(server.id)
    assert control["placement_group_id"] == group.id and control["private_net"][0]["ip"] == "10.0.1.5"

    with pytest.raises(APIException, match="protected"):
        seen.delete()
    with pytest.raises(APIException, match="already assigned"):
        _create(client, "web-2", location=Location(name="fsn1"),
                public_net=ServerCreatePublicNetwork(ipv4=PrimaryIP(id=primary.id)))  # fmt: skip
    with pytest.raises(APIException, match="already attached"):
        seen.attach_to_network(net, ip="10.0.1.9")
    other = _create(client, "web-3", location=Location(name="fsn1"))
    with pytest.raises(APIException, match="not available"):
        other.attach_to_network(net, ip="10.0.1.5")
    with pytest.raises(APIException, match=r"invalid input in field\(s\): delete"):
        seen.change_protection(delete=False)  # the API protects against deletion and rebuild together
    seen.change_protection(delete=False, rebuild=False).wait_until_finished()
    seen.delete().wait_until_finished()
    assert client.primary_ips.get_by_id(primary.id).assignee_id is None


def test_an_ipv6_only_server_has_no_ipv4_anywhere(sim: Simulator, client: hcloud.Client) -> None:
    server = _create(client, "v6-1", public_net=ServerCreatePublicNetwork(enable_ipv4=False))
    assert server.public_net.ipv4 is None and server.public_net.ipv6.ip.endswith("::/64")
    meta = ControlClient(sim.control_url, sim.token).server(server.id)
    assert meta["ipv4"] is None and meta["machine"]["ipv4"] is None
