"""The per-server metadata service answers in the shape of Hetzner's, filled from the server's state."""

from __future__ import annotations

import json
from typing import Any

import asyncssh
import hcloud
import requests
import yaml
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from simhelpers import SHARED, ident, ipv4, ipv6_network

from dabei_component.sim import Simulator

FIXTURE = SHARED / "fixtures" / "hetzner-metadata.json"


def shape(value: Any) -> Any:
    """The structure of a document: keys and leaf types, lists by the shape of their items."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(shape(item), sort_keys=True) for item in value})
    return type(value).__name__


def test_metadata_matches_fixture_shape_and_server_state(sim: Simulator, client: hcloud.Client) -> None:
    public_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    key = client.ssh_keys.create(name="meta", public_key=public_key)
    created = client.servers.create(
        name="meta-host", server_type=ServerType(name="cx22"), image=Image(name="debian-12"),
        location=Location(name="nbg1"), ssh_keys=[key], user_data="#cloud-config\n", start_after_create=False,
    )  # fmt: skip
    created.action.wait_until_finished()
    server = client.servers.get_by_id(ident(created.server))
    details = requests.get(
        f"{sim.control_url}/servers/{server.id}", headers={"Authorization": f"Bearer {sim.token}"}
    ).json()["server"]
    url = details["metadata_url"]
    assert url.endswith(f"/_metadata/{server.id}/hetzner/v1/metadata")

    document = yaml.safe_load(requests.get(url).text)
    assert shape(document) == shape(json.loads(FIXTURE.read_text()))
    assert document["hostname"] == "meta-host"
    assert document["instance-id"] == server.id
    assert document["public-ipv4"] == ipv4(server)
    assert document["availability-zone"].startswith("nbg1-dc")
    assert document["region"] == "eu-central"
    assert document["public-keys"] == [public_key]
    interface = document["network-config"]["config"][0]
    assert interface["mac_address"] == details["mac"] and interface["name"] == "eth0"
    static = interface["subnets"][1]
    assert static["address"] == ipv6_network(server).replace("::/64", "::1/64")
    assert static["gateway"] == "fe80::1"

    assert requests.get(f"{url}/hostname").text == "meta-host"
    assert requests.get(f"{url}/instance-id").text == str(server.id)
    assert requests.get(f"{url}/public-ipv4").text == ipv4(server)
    assert yaml.safe_load(requests.get(f"{url}/network-config").text) == document["network-config"]
    assert yaml.safe_load(requests.get(f"{url}/public-keys").text) == [public_key]
    assert requests.get(f"{url}/userdata").text == "#cloud-config\n"
    assert requests.get(url.removesuffix("/metadata") + "/userdata").text == "#cloud-config\n"
    assert requests.get(f"{url}/no-such-item").status_code == 404

    server.update(name="renamed")
    assert requests.get(f"{url}/hostname").text == "renamed"


def test_metadata_outage_for_n_requests(sim: Simulator, client: hcloud.Client) -> None:
    created = client.servers.create(
        name="down", server_type=ServerType(name="cx22"), image=Image(name="debian-12"), start_after_create=False
    )
    created.action.wait_until_finished()
    headers = {"Authorization": f"Bearer {sim.token}"}
    url = requests.get(f"{sim.control_url}/servers/{created.server.id}", headers=headers).json()["server"][
        "metadata_url"
    ]
    body = {"metadata": [{"server_id": created.server.id, "status": 503, "count": 2}]}
    assert requests.put(f"{sim.control_url}/faults", json=body, headers=headers).status_code == 200
    assert [requests.get(f"{url}/hostname").status_code for _ in range(3)] == [503, 503, 200]
    assert requests.get(url.replace(str(created.server.id), "999")).status_code == 404
