"""SSH keys and typed values as users write them in stack config, through the path a user takes: config
values -> `fleet_args_from_config` -> the program (which reads the project's keys through pulumi-hcloud's
`getSshKeys` invoke) -> `up` through the local engine, the real provider server and the simulator.

Hetzner key names are free text (`My ssh key` is the API specification's own example; the console proposes
a key's comment, `user@host`, as its name); a key ID typed by `pulumi config set --path` arrives as a
number; a pasted public key the project already holds under another name is used, not uploaded again
(Hetzner refuses a second key with the same fingerprint: `uniqueness_error`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hcloud import Client
from relhelpers import SimThread, Stack

from dabei_component.component import OWNER_LABEL
from dabei_component.demo import FIXTURE_FLAKE, fixture_image_attr
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.keys import generate_ssh_keypair, read_public_key
from dabei_component.localup import HCLOUD_SERVER, HCLOUD_SSH_KEY, UpFailed
from dabei_component.program import fleet_args_from_config

pytestmark = pytest.mark.timeout(600)

# Keys the project holds before the stack runs, by their (free-text) names.
NAMED = {name: generate_ssh_keypair(comment) for name, comment in [
    ("My ssh key", "admin@example"),
    ("ops laptop 2", ""),
    ("me@laptop", "me@laptop"),
    ("by id", "ci@runner"),
]}  # fmt: skip
HELD = generate_ssh_keypair("me@laptop")  # held as "laptop (old)", pasted with other comments
FRESH = generate_ssh_keypair("new@desk")  # not in the project: uploaded once for the fleet


@pytest.fixture(scope="module")
def project_keys(sim: SimThread) -> Iterator[dict[str, int]]:
    client = Client(token=sim.token, api_endpoint=sim.endpoint)
    ids = {name: client.ssh_keys.create(name=name, public_key=pair.public).id for name, pair in NAMED.items()}
    ids["laptop (old)"] = client.ssh_keys.create(name="laptop (old)", public_key=HELD.public).id
    yield {name: int(i or 0) for name, i in ids.items()}


def client(sim: SimThread) -> Client:
    return Client(token=sim.token, api_endpoint=sim.endpoint)


def config(stack: Stack, *hosts: dict[str, Any], deadlines: Any = None) -> Any:
    """Stack config as `pulumi config` hands it to the program (sshPort is a top-level key: a string)."""
    image = {"flake": f"path:{FIXTURE_FLAKE}", "attr": fixture_image_attr(), "nixArgs": list(OFFLINE_NIX_ARGS)}
    host_cfgs = [
        {"name": f"{stack.name}-{i}", "serverType": "cx22", "location": "fsn1", "flake": "github:example/infra", **h}
        for i, h in enumerate(hosts, 1)
    ]
    deadlines = deadlines or {"rescue": 120, "install": 180, "firstboot": 120}
    return fleet_args_from_config(image, host_cfgs, deadlines, str(stack.sim.ssh_port))


def posts(sim: SimThread, mark: int, path: str) -> list[int]:
    return [a.status for a in sim.api.since(mark) if a.method == "POST" and a.path == path]


def test_key_names_are_free_text_ids_are_ids_and_typed_values_mean_what_was_typed(
    sim: SimThread, new_stack: Any, project_keys: dict[str, int]
) -> None:
    stack = new_stack()
    # As `pulumi config set --path` stores them: the key ID and `2` as numbers, `true` as a boolean,
    # deadlines as text in a YAML file.
    keys: list[Any] = ["My ssh key", "ops laptop 2", "me@laptop", project_keys["by id"]]
    args = config(
        stack,
        {"sshKeys": keys, "labels": {"tier": 2, "managed": True}},
        deadlines={"rescue": "120", "install": 180, "firstboot": 120.0},
    )
    mark = sim.api.mark()
    outputs = stack.up(args)

    name = f"{stack.name}-1"
    assert outputs["hosts"][name]["system"]
    install = stack.hosts("install")[name]
    expected = [NAMED[n].public for n in ("My ssh key", "ops laptop 2", "me@laptop", "by id")]
    assert install["authorized_keys"][1:] == expected  # after the fleet's deploy key
    server = sim.server(install["server_id"])
    assert set(server["ssh_key_ids"]) >= {project_keys[n] for n in NAMED}
    assert client(sim).servers.get_by_id(int(install["server_id"])).labels == {"tier": "2", "managed": "true"}
    # Only the fleet's deploy key was uploaded.
    assert posts(sim, mark, "/ssh_keys") == [201]
    # The stand-in for pulumi-hcloud answers as pulumi-hcloud does: `ipv6Address` is the host address
    # (`<network>::1`), `ipv6Network` the /64; the stack's `ipv6` output is the address.
    recorded = stack.state[f"{HCLOUD_SERVER}::{stack.name}-{name}-server"].outputs
    assert recorded["ipv6Address"] == server["ipv6_address"] and recorded["ipv6Address"].endswith("::1")
    assert recorded["ipv6Network"] == server["ipv6_network"] and recorded["ipv6Network"].endswith("/64")
    assert outputs["hosts"][name]["ipv6"] == server["ipv6_address"]
    assert recorded["primaryDiskSize"] == 40 and recorded["labels"] == {"tier": "2", "managed": "true"}


def test_a_key_name_the_project_lacks_fails_before_anything_is_created_naming_the_config_key(
    sim: SimThread, new_stack: Any, project_keys: dict[str, int]
) -> None:
    stack = new_stack()
    damaged = "ssh-ed25519 AAAA@@@ me@laptop"
    args = config(stack, {"sshKeys": ["My ssh key", "my ssh key", damaged, 999_999]})
    mark = sim.api.mark()
    with pytest.raises(UpFailed) as failed:
        stack.up(args)
    text = str(failed.value)
    assert "nix-dabei:hosts[0].sshKeys[1]: no SSH key named 'my ssh key' in this Hetzner project" in text
    assert "'My ssh key'" in text and "names match exactly" in text
    assert f"nix-dabei:hosts[0].sshKeys[2]: no SSH key named {damaged!r}" in text
    assert "it is no public key either: the key data is not valid base64" in text
    assert "nix-dabei:hosts[0].sshKeys[3]: no SSH key with ID 999999 in this Hetzner project" in text
    assert "sshKeys[0]" not in text
    for prop in ("sshKeys[1]", "sshKeys[2]", "sshKeys[3]"):
        assert text.count(prop) == 1, text  # each property named once
    assert posts(sim, mark, "/servers") == [] and posts(sim, mark, "/ssh_keys") == []


def test_a_pasted_key_the_project_holds_is_used_and_one_it_lacks_is_uploaded_once_for_all_hosts(
    sim: SimThread, new_stack: Any, project_keys: dict[str, int]
) -> None:
    stack = new_stack()
    held_type, held_data = HELD.public.split()[:2]
    fresh_type, fresh_data = FRESH.public.split()[:2]
    first = {"sshKeys": [f"{held_type}   {held_data}   another comment  ", f"{fresh_type} {fresh_data} new@desk"]}
    second = {"sshKeys": [f"\n {held_type} {held_data}\n", f"{fresh_type} {fresh_data} the same key, other words"]}
    args = config(stack, first, second)
    mark = sim.api.mark()
    stack.up(args)

    # The deploy key and the fresh key, each once; the held key is not uploaded again (no 409).
    assert posts(sim, mark, "/ssh_keys") == [201, 201]
    fresh_key = read_public_key(FRESH.public)
    assert fresh_key is not None
    fresh = client(sim).ssh_keys.get_by_fingerprint(fresh_key.md5)
    assert fresh is not None and fresh.labels is not None and OWNER_LABEL in fresh.labels
    for host in stack.hosts("install").values():
        assert set(sim.server(host["server_id"])["ssh_key_ids"]) >= {project_keys["laptop (old)"], fresh.id}
        assert host["authorized_keys"][1].split()[:2] == [held_type, held_data]
        assert host["authorized_keys"][2].split()[:2] == [fresh_type, fresh_data]

    # The next run finds the fresh key as the fleet's own: kept, not uploaded again nor deleted, also when
    # its comment changes.
    args = config(stack, first, {"sshKeys": [*second["sshKeys"][:1], f"{fresh_type} {fresh_data} renamed"]})
    mark = sim.api.mark()
    stack.up(args)
    assert posts(sim, mark, "/ssh_keys") == []
    assert [a for a in sim.api.since(mark) if a.method == "DELETE"] == []
    uploaded = [k for k in stack.operations if k.startswith(f"{HCLOUD_SSH_KEY}::{stack.name}-key-")]
    assert len(uploaded) == 1 and stack.operations[uploaded[0]] == "same", stack.operations
