"""The component's resource graph under Pulumi's mocks: types, parents, inputs, secrets, preview."""

from __future__ import annotations

import asyncio
from typing import Any

import pulumi
import pytest
from pulumi.runtime.mocks import MockMonitor

from dabei_component.component import Deadlines, Fleet, FleetArgs, HostArgs, ImageArgs, InvalidArgs
from dabei_component.keys import generate_ssh_keypair

DEPLOY = generate_ssh_keypair()
HOST_KEYS = {n: generate_ssh_keypair() for n in ("web-1", "web-2")}
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@example"
LAPTOP = generate_ssh_keypair("me@laptop")
# What pulumi-hcloud's getSshKeys returns for the project's one key.
PROJECT_KEY = {"id": 31, "name": "laptop", "publicKey": LAPTOP.public, "fingerprint": "00:11", "labels": {}}


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.monitor: ParentRecordingMonitor | None = None
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.calls: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outs = dict(args.inputs)
        if args.typ == "hcloud:index/server:Server":
            outs.update(ipv4Address="192.0.2.10", ipv6Address="2001:db8::1")
            return "4711", outs
        if args.typ == "hcloud:index/sshKey:SshKey":
            outs["name"] = args.name
            return "99", outs
        if args.typ == "pulumi-python:dynamic:Resource" and args.name.endswith("-keys"):
            outs.update(
                deploy_public_key=DEPLOY.public,
                deploy_private_key=DEPLOY.private_openssh,
                host_public_keys={},
                host_private_keys={},
            )
        if args.typ == "pulumi-python:dynamic:Resource" and "host" in args.inputs:
            pair = HOST_KEYS[args.inputs["host"]]
            outs.update(public_key=pair.public, private_key=pair.private_openssh)
        if args.typ == "pulumi-python:dynamic:Resource" and isinstance(args.inputs.get("hosts"), dict):
            outs["hosts"] = {n: {**h, "system": f"/nix/store/x-{n}"} for n, h in args.inputs["hosts"].items()}
        return f"{args.name}-id", outs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        self.calls.append(args)
        assert args.token == "hcloud:index/getSshKeys:getSshKeys", args.token
        return {"id": "keys", "sshKeys": [PROJECT_KEY]}, []

    def by_name(self, name: str) -> pulumi.runtime.MockResourceArgs:
        return next(r for r in self.resources if r.name == name)


def fleet_args(**host_overrides: Any) -> FleetArgs:
    hosts = [
        HostArgs(name="web-1", server_type="cx22", location="fsn1", flake="github:o/r", ssh_keys=["laptop", USER_KEY]),
        HostArgs(name="web-2", server_type="cax11", location="nbg1", flake="github:o/r", reinstall="never"),
    ]
    for k, v in host_overrides.items():
        setattr(hosts[0], k, v)
    return FleetArgs(hosts=hosts, image=ImageArgs(flake="github:o/r"), deadlines=Deadlines())


class ParentRecordingMonitor(MockMonitor):
    """Pulumi's mock monitor, also noting each registration's parent (MockResourceArgs lacks it)."""

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.parents: dict[str, str] = {}

    def RegisterResource(self, request: Any) -> Any:
        self.parents[request.name] = request.parent.rsplit("::", 1)[-1] if request.parent else ""
        return super().RegisterResource(request)


def run(mocks: RecordingMocks, fn: Any, preview: bool = False) -> Any:
    asyncio.set_event_loop(asyncio.new_event_loop())
    mocks.monitor = ParentRecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="nix-dabei", stack="test", preview=preview, monitor=mocks.monitor)
    result: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> Any:
        return pulumi.Output.from_input(fn()).apply(lambda v: result.setdefault("v", v))

    program()
    return result.get("v")


def test_resource_graph_types_and_parents() -> None:
    mocks = RecordingMocks()
    run(mocks, lambda: Fleet("prod", fleet_args()).hosts["web-1"].system)
    types = {r.name: r.typ for r in mocks.resources}
    assert types["prod"] == "nix-dabei:index:Fleet"
    assert types["prod-web-1"] == "nix-dabei:index:Host"
    assert types["prod-web-2"] == "nix-dabei:index:Host"
    assert types["prod-deploy"] == "hcloud:index/sshKey:SshKey"
    # The pasted key the project does not hold is uploaded, named after its fingerprint.
    uploaded = [n for n, t in types.items() if t == "hcloud:index/sshKey:SshKey" and n != "prod-deploy"]
    assert len(uploaded) == 1 and uploaded[0].startswith("prod-key-"), uploaded
    dynamic = sorted(n for n, t in types.items() if t == "pulumi-python:dynamic:Resource")
    assert dynamic == [
        "prod-firstboot",
        "prod-image",
        "prod-install",
        "prod-keys",
        "prod-rescue",
        "prod-web-1-hostkey",
        "prod-web-2-hostkey",
    ]
    # Two hcloud servers, named after the hosts, each a child of its Host component.
    servers = [r for r in mocks.resources if r.typ == "hcloud:index/server:Server"]
    assert sorted(r.inputs["name"] for r in servers) == ["web-1", "web-2"]
    assert {r.inputs["image"] for r in servers} == {"debian-12"}
    assert mocks.monitor is not None
    parents = mocks.monitor.parents
    assert parents["prod-web-1-server"] == "prod-web-1"
    assert parents["prod-web-1-hostkey"] == "prod-web-1"
    for child in ("prod-web-1", "prod-web-2", "prod-keys", "prod-deploy", "prod-image", "prod-rescue", "prod-install"):
        assert parents[child] == "prod", child
    assert parents["prod-firstboot"] == "prod"


def test_host_steps_get_every_host_in_one_resource() -> None:
    mocks = RecordingMocks()
    run(mocks, lambda: Fleet("prod", fleet_args()).hosts["web-2"].system)
    rescue = mocks.by_name("prod-rescue").inputs
    assert sorted(rescue["hosts"]) == ["web-1", "web-2"]
    web1 = rescue["hosts"]["web-1"]
    assert web1["server_id"] == 4711
    assert web1["ipv4"] == "192.0.2.10"
    assert web1["disk"] == "/dev/sda"
    assert web1["host_public_key"] == HOST_KEYS["web-1"].public
    # Root's keys: the deploy key, the Hetzner key looked up by name, and the literal public key.
    assert web1["authorized_keys"] == [DEPLOY.public, LAPTOP.public, USER_KEY]
    assert rescue["hosts"]["web-2"]["reinstall"] == "never"
    assert rescue["rescue_ssh_key_ids"] == [99]
    # One read of the project's keys for the whole fleet.
    assert [c.token for c in mocks.calls] == ["hcloud:index/getSshKeys:getSshKeys"]
    install = mocks.by_name("prod-install").inputs
    assert install["host_private_keys"] == {n: k.private_openssh for n, k in HOST_KEYS.items()}


def test_connection_output_is_secret_and_pins_host_key() -> None:
    mocks = RecordingMocks()

    def program() -> Any:
        host = Fleet("prod", fleet_args()).hosts["web-1"]
        return pulumi.Output.all(host.connection, pulumi.Output.from_input(host.connection.is_secret()))

    connection, is_secret = run(mocks, program)
    assert is_secret is True
    assert connection["host_key"] == HOST_KEYS["web-1"].public
    assert connection["private_key"] == DEPLOY.private_openssh
    assert connection["user"] == "root"


def test_known_hosts_line_and_system_output() -> None:
    mocks = RecordingMocks()

    def program() -> Any:
        host = Fleet("prod", fleet_args()).hosts["web-1"]
        return pulumi.Output.all(host.known_hosts, host.system)

    known_hosts, system = run(mocks, program)
    assert known_hosts == f"192.0.2.10 {HOST_KEYS['web-1'].public}"
    assert system == "/nix/store/x-web-1"


def test_preview_with_unknown_server_ids_does_not_fail() -> None:
    mocks = RecordingMocks()
    run(mocks, lambda: Fleet("prod", fleet_args()).hosts["web-1"].ipv4, preview=True)
    assert any(r.name == "prod-firstboot" for r in mocks.resources)


@pytest.mark.parametrize(
    ("override", "prop"),
    [
        ({"name": "Web_1"}, "hosts[0].name"),
        ({"name": "-web"}, "hosts[0].name"),
        ({"name": "a" * 64}, "hosts[0].name"),
        ({"server_type": ""}, "hosts[0].server_type"),
        ({"location": "fsn 1"}, "hosts[0].location"),
        ({"flake": "github:o/r#web-1"}, "hosts[0].flake"),
        ({"flake": "not a flake"}, "hosts[0].flake"),
        ({"ssh_keys": [""]}, "hosts[0].ssh_keys[0]"),
        ({"ssh_keys": ["ssh-ed25519 AAAA@@@ x"]}, "hosts[0].ssh_keys[0]"),
        ({"ssh_keys": [USER_KEY + "\n" + USER_KEY]}, "hosts[0].ssh_keys[0]"),
        ({"ssh_keys": "laptop"}, "hosts[0].ssh_keys"),
        ({"labels": {"bad key!": "x"}}, "hosts[0].labels.bad key!"),
        ({"labels": {"k": "v" * 64}}, "hosts[0].labels.k"),
        ({"firewall_ids": [-1]}, "hosts[0].firewall_ids"),
        ({"disk": "/dev/sda1; rm -rf /"}, "hosts[0].disk"),
        ({"disk": "sda"}, "hosts[0].disk"),
        ({"reinstall": "on-image-change"}, "hosts[0].reinstall"),
        ({"reinstall": "next week"}, "hosts[0].reinstall"),
        ({"reinstall": ""}, "hosts[0].reinstall"),
        ({"name": "web-2"}, "hosts[1].name"),
    ],
)
def test_bad_host_input_is_rejected_naming_the_property(override: dict[str, Any], prop: str) -> None:
    with pytest.raises(InvalidArgs) as exc:
        Fleet("prod", fleet_args(**override))
    assert prop in [p for p, _ in exc.value.problems], exc.value.problems
    assert prop in str(exc.value)


@pytest.mark.parametrize("seconds", [0, -5, "10", True])
def test_non_positive_deadline_is_rejected(seconds: Any) -> None:
    args = fleet_args()
    args.deadlines.install = seconds
    with pytest.raises(InvalidArgs, match=r"deadlines\.install"):
        Fleet("prod", args)


def test_empty_fleet_is_rejected() -> None:
    with pytest.raises(InvalidArgs, match="hosts"):
        Fleet("prod", FleetArgs(hosts=[], image=ImageArgs(flake="github:o/r")))


def test_key_plan_reuses_keys_by_fingerprint_and_keeps_the_fleets_own_upload() -> None:
    """Pasted keys resolve by fingerprint: a key the project holds (under any name, with any comment) is
    used; one uploaded by another fleet too; one this fleet uploaded stays its upload; a missing name or ID
    is a problem naming the entry."""
    from dabei_component.component import OWNER_LABEL, ProjectKey, plan_user_keys
    from dabei_component.keys import read_public_key

    held, theirs, ours, fresh = (generate_ssh_keypair(c) for c in ("a@x", "b@x", "c@x", "d@x"))
    md5 = {k.public: read_public_key(k.public).md5 for k in (held, theirs, ours, fresh)}  # type: ignore[union-attr]
    project = [
        ProjectKey(1, "laptop (old)", held.public, md5[held.public], {}),
        ProjectKey(2, "other-fleet-key", theirs.public, md5[theirs.public], {OWNER_LABEL: "another"}),
        ProjectKey(3, "prod-key-x", ours.public, md5[ours.public], {OWNER_LABEL: "mine"}),
    ]
    bare = " ".join(held.public.split()[:2])
    hosts = [
        HostArgs(name="a", server_type="cx22", location="fsn1", flake="github:o/r",
                 ssh_keys=[f"  {bare}  other comment ", theirs.public, ours.public, fresh.public]),
        HostArgs(name="b", server_type="cx22", location="fsn1", flake="github:o/r",
                 ssh_keys=[bare, "laptop (old)", 1, fresh.public.replace(" d@x", " other@host"), "nope", 99]),
    ]  # fmt: skip
    plan = plan_user_keys(hosts, project, owner="mine")
    assert plan.server_keys["a"] == [1, 2, md5[ours.public], md5[fresh.public]]
    # The name, the ID and the pasted key are one key: listed once.
    assert plan.server_keys["b"] == [1, md5[fresh.public]]
    assert plan.upload == {
        md5[ours.public]: " ".join(ours.public.split()[:2]),
        md5[fresh.public]: " ".join(fresh.public.split()[:2]),
    }
    assert plan.authorized["b"] == [bare, fresh.public.replace(" d@x", " other@host")]
    assert [p for p, _ in plan.problems] == ["hosts[1].ssh_keys[4]", "hosts[1].ssh_keys[5]"]


@pytest.mark.parametrize("comment", ["jürgen@büro", "ops\u00a0laptop", "🔑 key", "ops: laptop (2) é"])
def test_a_pasted_key_with_any_comment_is_a_key(comment: str) -> None:
    """Comments are no part of a key: one that asyncssh would not decode (not ASCII) does not make the
    line a key name."""
    from dabei_component.keys import read_public_key

    pair = generate_ssh_keypair()
    read = read_public_key(f"{pair.public} {comment}")
    assert read is not None and read.blob == " ".join(pair.public.split()[:2])
