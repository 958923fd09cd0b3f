"""The simulator's API driven by the official hcloud library (and raw HTTP where the library hides things)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncssh
import hcloud
import pytest
import requests
from hcloud.actions import ActionFailedException
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer
from hcloud.ssh_keys import BoundSSHKey
from simhelpers import RECORDER, ident, ipv4, ipv6_network, key_ids

from dabei_component.sim import Simulator


def control(sim: Simulator, method: str, path: str, body: Any = None) -> Any:
    response = requests.request(
        method, f"{sim.control_url}{path}", json=body, headers={"Authorization": f"Bearer {sim.token}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def new_key(client: hcloud.Client, name: str) -> tuple[asyncssh.SSHKey, BoundSSHKey]:
    private = asyncssh.generate_private_key("ssh-ed25519")
    bound = client.ssh_keys.create(name=name, public_key=private.export_public_key().decode().strip())
    return private, bound


def create_server(client: hcloud.Client, name: str, **kwargs: Any) -> BoundServer:
    kwargs.setdefault("server_type", ServerType(name="cx22"))
    kwargs.setdefault("image", Image(name="debian-12"))
    response = client.servers.create(name=name, **kwargs)
    response.action.wait_until_finished()
    for action in response.next_actions:
        action.wait_until_finished()
    return client.servers.get_by_id(ident(response.server))


async def run_in_rescue(ip: str, port: int, key: asyncssh.SSHKey, command: str) -> str:
    async with asyncssh.connect(ip, port, username="root", client_keys=[key], known_hosts=None) as conn:
        result = await conn.run(command, check=True)
        return str(result.stdout)


def test_create_rescue_reset_ssh_write_disk_delete(sim: Simulator, client: hcloud.Client) -> None:
    private, key = new_key(client, "deploy")
    created = client.servers.create(
        name="web-1", server_type=ServerType(name="cx22"), image=Image(name="debian-12"), ssh_keys=[key]
    )
    assert created.server.status == "initializing"
    assert created.root_password is None  # an SSH key was given
    assert [a.command for a in created.next_actions] == ["start_server"]
    created.action.wait_until_finished()
    created.next_actions[0].wait_until_finished()
    server = client.servers.get_by_id(ident(created.server))
    assert server.status == "running"
    assert ipv4(server).startswith("127.77.")
    assert ipv6_network(server).startswith("2001:db8:") and ipv6_network(server).endswith("::/64")

    rescue = server.enable_rescue(type="linux64", ssh_keys=key_ids(key))
    assert rescue.root_password
    rescue.action.wait_until_finished()
    assert client.servers.get_by_id(ident(server)).rescue_enabled
    server.reset().wait_until_finished()
    server = client.servers.get_by_id(ident(server))
    assert server.status == "running"
    assert server.rescue_enabled is False  # consumed by the boot into it

    details = control(sim, "GET", f"/servers/{server.id}")["server"]
    assert details["machine"]["mode"] == "rescue"
    assert rescue.root_password not in str(details)
    out = asyncio.run(
        run_in_rescue(
            ipv4(server),
            sim.ssh_port,
            private,
            "hostname; printf simulated-disk | dd of=/dev/sda conv=notrunc status=none; sync;"
            " dd if=/dev/sda bs=14 count=1 status=none",
        )
    )
    assert out.splitlines()[0] == "rescue"
    assert out.endswith("simulated-disk")
    disk = details["machine"]["disk_path"]
    with open(disk, "rb") as f:
        assert f.read(14) == b"simulated-disk"

    server.delete().wait_until_finished()
    with pytest.raises(hcloud.APIException) as missing:
        client.servers.get_by_id(ident(server))
    assert missing.value.code == "not_found"


def test_list_filters_pagination_sort(sim: Simulator, client: hcloud.Client) -> None:
    for i in range(7):
        labels = {"role": "web" if i % 2 else "db", "index": str(i)}
        if i < 3:
            labels["canary"] = ""
        client.servers.create(
            name=f"node-{i}",
            server_type=ServerType(name="cpx11"),
            image=Image(name="ubuntu-24.04"),
            location=Location(name="hel1"),
            labels=labels,
            start_after_create=False,
        ).action.wait_until_finished()

    page = client.servers.get_list(page=2, per_page=3)
    assert [s.name for s in page.servers] == ["node-3", "node-4", "node-5"]
    pagination = page.meta.pagination
    assert pagination is not None
    assert (pagination.page, pagination.previous_page, pagination.next_page) == (2, 1, 3)
    assert (pagination.last_page, pagination.total_entries) == (3, 7)
    assert len(client.servers.get_all()) == 7

    def names(**kwargs: Any) -> list[str]:
        return sorted(str(s.name) for s in client.servers.get_all(**kwargs))

    assert names(label_selector="role=web") == ["node-1", "node-3", "node-5"]
    assert names(label_selector="role!=web,canary") == ["node-0", "node-2"]
    assert names(label_selector="index in (1,6),role") == ["node-1", "node-6"]
    assert names(label_selector="index notin (0,1,2,3,4),!canary") == ["node-5", "node-6"]
    assert names(name="node-4") == ["node-4"]
    assert names(status=["off"]) == [f"node-{i}" for i in range(7)]
    assert names(status=["running"]) == []
    by_name_desc = client.request("GET", "/servers", params={"sort": "name:desc", "per_page": 2})
    assert [s["name"] for s in by_name_desc["servers"]] == ["node-6", "node-5"]
    server = client.servers.get_by_name("node-2")
    assert server is not None and server.location is not None and server.location.name == "hel1"
    assert server.server_type is not None and server.server_type.name == "cpx11"
    assert server.image is not None and server.image.name == "ubuntu-24.04"


def test_update_and_uniqueness(sim: Simulator, client: hcloud.Client) -> None:
    _, key = new_key(client, "k1")
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    with pytest.raises(hcloud.APIException) as same_name:
        client.ssh_keys.create(name="k1", public_key=other_key)
    assert same_name.value.code == "uniqueness_error"
    assert same_name.value.details == {"fields": [{"name": "name"}]}
    with pytest.raises(hcloud.APIException) as same_key:
        client.ssh_keys.create(name="k2", public_key=str(key.public_key))
    assert same_key.value.code == "uniqueness_error"
    assert same_key.value.details == {"fields": [{"name": "public_key"}]}
    found = client.ssh_keys.get_by_fingerprint(str(key.fingerprint))
    assert found is not None and found.id == key.id

    a = create_server(client, "a", start_after_create=False)
    create_server(client, "b", start_after_create=False)
    updated = a.update(name="a2", labels={"env": "prod"})
    assert (updated.name, updated.labels) == ("a2", {"env": "prod"})
    with pytest.raises(hcloud.APIException) as taken:
        a.update(name="b")
    assert taken.value.code == "uniqueness_error"
    with pytest.raises(hcloud.APIException) as duplicate:
        client.servers.create(name="b", server_type=ServerType(name="cx22"), image=Image(name="debian-12"))
    assert duplicate.value.code == "uniqueness_error"
    assert client.servers.get_by_id(ident(a)).name == "a2"


def test_invalid_input_names_the_fields(sim: Simulator, client: hcloud.Client) -> None:
    def invalid(**kwargs: Any) -> dict[str, list[str]]:
        with pytest.raises(hcloud.APIException) as error:
            client.servers.create(**kwargs)
        assert error.value.code == "invalid_input"
        return {f["name"]: f["messages"] for f in error.value.details["fields"]}

    base: dict[str, Any] = {"name": "ok", "server_type": ServerType(name="cx22"), "image": Image(name="debian-12")}
    assert "name" in invalid(**{**base, "name": "under_score"})
    assert "server_type" in invalid(**{**base, "server_type": ServerType(name="cx99")})
    assert "image" in invalid(**{**base, "image": Image(name="windows-11")})
    assert "image" in invalid(**{**base, "server_type": ServerType(name="cax11"), "image": Image(id=114690387)})
    assert "location" in invalid(**{**base, "location": Location(name="mars1")})
    assert "labels" in invalid(**{**base, "labels": {"hetzner.cloud/x": "y"}})
    messages = invalid(**{**base, "labels": {"ok": "bad value!"}})["labels"]
    assert any("bad value!" in m for m in messages)
    with pytest.raises(hcloud.APIException) as bad_key:
        client.ssh_keys.create(name="x", public_key="ssh-ed25519 not-base64!")
    assert bad_key.value.code == "invalid_input"
    assert bad_key.value.details["fields"][0]["name"] == "public_key"
    with pytest.raises(hcloud.APIException) as selector:
        client.servers.get_all(label_selector="a in (b")
    assert selector.value.code == "invalid_input"


def test_server_types_carry_their_locations_and_architecture(sim: Simulator, client: hcloud.Client) -> None:
    """CAX (Arm64) and CX in Hetzner's EU locations only; CPX and CCX everywhere. Creating a type where it
    is not offered fails with the real API's answer."""
    eu, everywhere = {"fsn1", "nbg1", "hel1"}, {"fsn1", "nbg1", "hel1", "ash", "hil", "sin"}
    types = {t.name: t for t in client.server_types.get_all()}
    offered = {name: {loc.location.name for loc in t.locations or [] if loc.location} for name, t in types.items()}
    assert offered["cax11"] == eu and types["cax11"].architecture == "arm"
    assert offered["cx22"] == eu and types["cx22"].architecture == "x86"
    assert offered["cpx11"] == everywhere and offered["ccx13"] == everywhere
    assert {p["location"] for p in types["cax11"].prices or []} == eu
    for server_type, location in [("cax11", "ash"), ("cax11", "sin"), ("cx22", "hil")]:
        with pytest.raises(hcloud.APIException) as refused:
            create_server(client, f"{server_type}-{location}", server_type=ServerType(name=server_type),
                          location=Location(name=location))  # fmt: skip
        assert (refused.value.code, refused.value.message) == ("invalid_input", "unsupported location for server type")
    assert client.servers.get_all(name="cax11-ash") == []
    arm = create_server(client, "cax11-hel1", server_type=ServerType(name="cax11"), location=Location(name="hel1"))
    assert arm.server_type.architecture == "arm" and arm.image is not None and arm.image.architecture == "arm"


def test_not_found_unauthorized_and_json_errors(sim: Simulator, client: hcloud.Client) -> None:
    for call in (
        lambda: client.servers.get_by_id(424242),
        lambda: client.actions.get_by_id(424242),
        lambda: client.images.get_by_id(424242),
        lambda: client.ssh_keys.get_by_id(424242),
        lambda: client.request("GET", "/no_such_thing"),
    ):
        with pytest.raises(hcloud.APIException) as missing:
            call()
        assert missing.value.code == "not_found"
    stranger = hcloud.Client(token="x" * 64, api_endpoint=sim.endpoint)
    with pytest.raises(hcloud.APIException) as denied:
        stranger.servers.get_all()
    assert denied.value.code == "unauthorized"
    no_token = requests.get(f"{sim.endpoint}/servers")
    assert no_token.status_code == 401
    assert no_token.json()["error"]["code"] == "unauthorized"
    broken = requests.post(f"{sim.endpoint}/ssh_keys", data="{", headers={"Authorization": f"Bearer {sim.token}"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "json_error"
    control_denied = requests.get(f"{sim.control_url}/durations")
    assert control_denied.status_code == 401


def test_locked_while_an_action_runs(sim: Simulator, client: hcloud.Client) -> None:
    server = create_server(client, "busy")
    control(sim, "PUT", "/durations", {"reboot": 1.0})
    reboot = server.reboot()
    with pytest.raises(hcloud.APIException) as busy:
        server.power_off()
    assert busy.value.code == "locked"
    assert client.servers.get_by_id(ident(server)).locked is True
    progress = [client.actions.get_by_id(ident(reboot)).progress or 0]
    reboot.wait_until_finished()
    progress.append(client.actions.get_by_id(ident(reboot)).progress or 0)
    assert progress[0] < 100 and progress[1] == 100
    assert client.servers.get_by_id(ident(server)).locked is False
    server.power_off().wait_until_finished()
    assert client.servers.get_by_id(ident(server)).status == "off"
    server.power_on().wait_until_finished()
    server.shutdown().wait_until_finished()
    assert client.servers.get_by_id(ident(server)).status == "off"


def test_rate_limit_headers_budget_and_429(sim: Simulator, client: hcloud.Client) -> None:
    headers = {"Authorization": f"Bearer {sim.token}"}
    first = requests.get(f"{sim.endpoint}/locations", headers=headers)
    assert first.headers["RateLimit-Limit"] == "3600"
    remaining = int(first.headers["RateLimit-Remaining"])
    second = requests.get(f"{sim.endpoint}/server_types", headers=headers)
    assert int(second.headers["RateLimit-Remaining"]) == remaining - 1
    assert int(second.headers["RateLimit-Reset"]) >= int(time.time())

    control(sim, "PUT", "/ratelimit", {"limit": 10, "period": 3600, "remaining": 1})
    assert requests.get(f"{sim.endpoint}/locations", headers=headers).status_code == 200
    exhausted = requests.get(f"{sim.endpoint}/locations", headers=headers)
    assert exhausted.status_code == 429
    assert exhausted.json()["error"]["code"] == "rate_limit_exceeded"
    assert exhausted.headers["RateLimit-Remaining"] == "0"
    assert int(exhausted.headers["RateLimit-Reset"]) > int(time.time())
    control(sim, "PUT", "/ratelimit", {"limit": 3600, "remaining": 3600})

    # An injected 429 on one route: the hcloud library retries it (about a second later) and succeeds.
    control(sim, "PUT", "/faults", {"api": [{"method": "GET", "path": "/locations", "status": 429,
                                             "code": "rate_limit_exceeded", "count": 1}]})  # fmt: skip
    seen = len(RECORDER.checked)
    assert {loc.name for loc in client.locations.get_all()} == {"fsn1", "nbg1", "hel1", "ash", "hil", "sin"}
    statuses = [status for method, route, status in RECORDER.checked[seen:] if route == "/locations"]
    assert statuses == [429, 200]


def test_injected_api_errors_and_action_failures(sim: Simulator, client: hcloud.Client) -> None:
    server = create_server(client, "flaky")
    control(
        sim,
        "PUT",
        "/faults",
        {
            "api": [{"method": "POST", "path": "/servers/*/actions/poweroff", "status": 503,
                     "code": "service_error", "count": 1}],
            "actions": [{"command": "reset_server", "code": "action_failed", "message": "boom", "count": 1}],
        },
    )  # fmt: skip
    with pytest.raises(hcloud.APIException) as unavailable:
        server.power_off()
    assert unavailable.value.code == "service_error"
    with pytest.raises(ActionFailedException) as failed:
        server.reset().wait_until_finished()
    assert failed.value.action.error == {"code": "action_failed", "message": "boom"}
    server.reset().wait_until_finished()  # the fault was for one action only
    assert control(sim, "GET", "/faults")["faults"]["actions"] == []
    bad = requests.put(
        f"{sim.control_url}/faults",
        json={"api": [{"path": "/servers"}]},
        headers={"Authorization": f"Bearer {sim.token}"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["details"]["fields"] == [
        {"name": "api[0]", "messages": ["give exactly one of count or seconds"]}
    ]


def test_slow_action_fault_runs_longer(sim: Simulator, client: hcloud.Client) -> None:
    server = create_server(client, "slow")
    control(sim, "PUT", "/faults", {"slow_actions": [{"command": "reboot_server", "extra_seconds": 2.0,
                                                      "count": 1}]})  # fmt: skip
    action = server.reboot()
    reloaded = client.actions.get_by_id(ident(action))
    assert reloaded.status == "running"
    action.wait_until_finished()
    assert client.actions.get_by_id(ident(action)).status == "success"


def test_create_image_lists_snapshot(sim: Simulator, client: hcloud.Client) -> None:
    server = create_server(client, "imaged", start_after_create=False)
    made = server.create_image(description="golden", labels={"kind": "golden"})
    assert made.image.status == "creating"
    made.action.wait_until_finished()
    snapshots = client.images.get_all(type=["snapshot"])
    assert [(i.id, i.description, i.status) for i in snapshots] == [(made.image.id, "golden", "available")]
    assert snapshots[0].created_from is not None and snapshots[0].created_from.id == server.id
    assert [i.id for i in client.images.get_all(label_selector="kind=golden")] == [made.image.id]
    system = {(i.name, i.architecture) for i in client.images.get_all(type=["system"])}
    assert ("debian-12", "arm") in system and ("ubuntu-24.04", "x86") in system
    client.images.delete(snapshots[0])
    assert client.images.get_all(type=["snapshot"]) == []

    control(sim, "PUT", "/faults", {"actions": [{"command": "create_image", "count": 1}]})
    broken = server.create_image(description="broken")
    with pytest.raises(ActionFailedException):
        broken.action.wait_until_finished()
    assert client.images.get_by_id(ident(broken.image)).status == "unavailable"


def test_actions_by_id_list_and_per_server(sim: Simulator, client: hcloud.Client) -> None:
    created = client.servers.create(name="polled", server_type=ServerType(name="cx22"), image=Image(name="debian-12"))
    assert created.root_password  # no SSH key: a root password is generated
    ids = [created.action.id, created.next_actions[0].id]
    headers = {"Authorization": f"Bearer {sim.token}"}
    deadline = time.monotonic() + 30
    while True:
        body = requests.get(f"{sim.endpoint}/actions", params={"id": ids}, headers=headers).json()
        assert sorted(a["id"] for a in body["actions"]) == sorted(ids)
        if all(a["status"] != "running" for a in body["actions"]) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {a["status"] for a in body["actions"]} == {"success"}
    server = client.servers.get_by_id(ident(created.server))
    commands = [a.command for a in server.get_actions(sort=["id"])]
    assert commands == ["create_server", "start_server"]
    one = client.servers.actions.get_by_id(ids[0])
    assert one.command == "create_server"
    other = create_server(client, "other", start_after_create=False)
    with pytest.raises(hcloud.APIException) as foreign:
        client.request("GET", f"/servers/{other.id}/actions/{ids[0]}")
    assert foreign.value.code == "not_found"


def test_rescue_expires_unused(sim: Simulator, client: hcloud.Client) -> None:
    server = create_server(client, "expiring", start_after_create=False)
    control(sim, "PUT", "/durations", {"rescue_expiry": 1.5})
    server.enable_rescue().action.wait_until_finished()
    assert client.servers.get_by_id(ident(server)).rescue_enabled is True
    time.sleep(2.0)
    assert client.servers.get_by_id(ident(server)).rescue_enabled is False
    server.power_on().wait_until_finished()
    assert control(sim, "GET", f"/servers/{server.id}")["server"]["machine"]["mode"] == "disk"


def test_durations_control_validates(sim: Simulator) -> None:
    assert control(sim, "PUT", "/durations", {"boot": 0.2})["durations"]["boot"] == 0.2
    bad = requests.put(
        f"{sim.control_url}/durations", json={"bot": 1}, headers={"Authorization": f"Bearer {sim.token}"}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["details"]["fields"][0]["name"] == "bot"
