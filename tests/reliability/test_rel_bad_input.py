"""Malformed inputs are rejected by the step providers' `check()` at preview, through the real provider
server, before any API call or SSH connection, each with an error that names the property and says what is
expected. Wrong types in stack config are rejected when the program reads it (`fleet_args_from_config`),
before any resource is declared.

The provider server is configured with a trap as its API endpoint and SSH port: a listener that counts
connections, which must stay at zero. Unknown server types and locations are checked against the API's
catalog when a token is configured (read-only GETs of /server_types and /locations, once per provider
process); those cases run against the simulator and check that nothing else was requested.
"""

from __future__ import annotations

import copy
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from relhelpers import SimThread

from dabei_component.component import InvalidArgs
from dabei_component.demo import FIXTURE_FLAKE, fixture_image_attr
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.keys import generate_ssh_keypair
from dabei_component.program import fleet_args_from_config
from dabei_component.provider_server import ProviderServer
from dabei_component.steps.firstboot import FirstBootProvider
from dabei_component.steps.image import ImageProvider
from dabei_component.steps.install import InstallProvider
from dabei_component.steps.keys import HostKeyProvider
from dabei_component.steps.rescue import RescueProvider

URN = "urn:pulumi:test::nix-dabei::pulumi-python:dynamic:Resource::step"
DEPLOY = generate_ssh_keypair()
HOST = generate_ssh_keypair()
OTHER = generate_ssh_keypair()
TRAP_ADDRESSES = ("127.0.0.1", "127.0.0.2")


class Trap:
    """Listens on one port of a few loopback addresses and counts every connection made to it."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._socks: list[socket.socket] = []
        for address in TRAP_ADDRESSES:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, self.port))
            self.port = sock.getsockname()[1]
            sock.listen()
            sock.settimeout(0.2)
            self._socks.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            for sock in self._socks:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                self.connections += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._socks:
            sock.close()


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()
    assert t.connections == 0, "a check reached out to the API or a host"


@pytest.fixture(scope="module")
def trapped(trap: Trap, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderServer]:
    tmp = tmp_path_factory.mktemp("trapped")
    server = ProviderServer(project="nix-dabei", log_path=tmp / "provider.log", env={"XDG_CACHE_HOME": str(tmp)})
    # No token: the catalog check (the only API read of a check) is covered against the simulator below.
    server.configure({"hcloud:endpoint": f"http://127.0.0.1:{trap.port}/v1", "nix-dabei:sshPort": str(trap.port)})
    yield server
    server.close()


def host(**overrides: Any) -> dict[str, Any]:
    return {
        "server_id": 42,
        "ipv4": "127.0.0.1",
        "image": "/nix/store/0000000000000000000000000000000a-image",
        "reinstall": "2026-11-30",
        "disk": "/dev/sda",
        "flake": "github:example/infra",
        "hostname": "web-1",
        "server_type": "cx22",
        "location": "fsn1",
        "host_public_key": HOST.public,
        "authorized_keys": [DEPLOY.public],
        **overrides,
    }


STEPS: dict[str, Callable[[], Any]] = {
    "rescue": RescueProvider,
    "install": InstallProvider,
    "firstboot": FirstBootProvider,
}


def step_props(step: str, hosts: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "hosts": hosts if hosts is not None else {"web-1": host()},
        "deploy_private_key": DEPLOY.private_openssh,
        "deadline_seconds": 600,
    }
    if step in ("rescue", "install"):
        props["rescue_ssh_key_ids"] = [7]
    if step == "install":
        props["image"] = {"out_path": "/nix/store/0000000000000000000000000000000a-image", "seed_size": 1048576}
        props["host_private_keys"] = {"web-1": HOST.private_openssh}
    return props


def failures(server: ProviderServer, provider: Any, props: dict[str, Any]) -> dict[str, str]:
    return dict(server.check(URN, {}, server.with_provider(provider, props)).failures)


@pytest.mark.parametrize("step", list(STEPS))
def test_well_formed_inputs_pass(trapped: ProviderServer, step: str) -> None:
    assert failures(trapped, STEPS[step](), step_props(step)) == {}


def set_host(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(props: dict[str, Any]) -> None:
        props["hosts"]["web-1"].update(fields)

    return mutate


def drop_host_field(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda props: props["hosts"]["web-1"].pop(name)


def set_prop(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda props: props.__setitem__(name, value)


def rename_host(new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(props: dict[str, Any]) -> None:
        props["hosts"] = {new: {**props["hosts"]["web-1"], "hostname": new}}

    return mutate


def second_host(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(props: dict[str, Any]) -> None:
        other = {**props["hosts"]["web-1"], "hostname": "web-2", "host_public_key": OTHER.public, **fields}
        props["hosts"]["web-2"] = other
        if "host_private_keys" in props:
            props["host_private_keys"]["web-2"] = OTHER.private_openssh

    return mutate


# (step, change, property named, words of the reason)
BAD_STEP_INPUTS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str, str]] = {
    "hostname-uppercase": ("rescue", rename_host("Web_1"), "hosts.Web_1", "not a valid hostname"),
    "hostname-too-long": ("install", rename_host("a" * 64), "hosts." + "a" * 64, "1-63 lowercase letters"),
    "hostname-mismatch": ("firstboot", set_host(hostname="web-9"), "hosts.web-1.hostname", "the host's name 'web-1'"),
    "flake-with-attr": ("firstboot", set_host(flake="github:o/r#web-1"), "hosts.web-1.flake", "leave out '#…'"),
    "flake-spaces": ("install", set_host(flake="not a flake"), "hosts.web-1.flake", "flake reference"),
    "flake-empty": ("rescue", set_host(flake=""), "hosts.web-1.flake", "flake reference"),
    "flake-missing": ("firstboot", drop_host_field("flake"), "hosts.web-1.flake", "required"),
    "disk-injection": ("install", set_host(disk="/dev/sda1; rm -rf /"), "hosts.web-1.disk", "whole-disk device"),
    "disk-relative": ("rescue", set_host(disk="sda"), "hosts.web-1.disk", "whole-disk device"),
    "reinstall-old-policy": ("rescue", set_host(reinstall="on-image-change"), "hosts.web-1.reinstall", "is gone"),
    "reinstall-not-an-id": ("rescue", set_host(reinstall="next week"), "hosts.web-1.reinstall", "request ID"),
    "authorized-keys-empty": ("install", set_host(authorized_keys=[]), "hosts.web-1.authorized_keys", "non-empty list"),
    "authorized-keys-string": (
        "install",
        set_host(authorized_keys=DEPLOY.public),
        "hosts.web-1.authorized_keys",
        "list of OpenSSH public keys",
    ),
    "authorized-key-bad-base64": (
        "install",
        set_host(authorized_keys=["ssh-ed25519 AAAA@@@ me"]),
        "hosts.web-1.authorized_keys[0]",
        "not valid base64",
    ),
    "authorized-keys-joined": (
        "install",
        set_host(authorized_keys=[DEPLOY.public + "\n" + OTHER.public]),
        "hosts.web-1.authorized_keys[0]",
        "one key per entry",
    ),
    "host-key-empty": ("firstboot", set_host(host_public_key=""), "hosts.web-1.host_public_key", "is empty"),
    "host-key-type-mismatch": (
        "install",
        set_host(host_public_key="ssh-rsa " + HOST.public.split()[1]),
        "hosts.web-1.host_public_key",
        "but the line says 'ssh-rsa'",
    ),
    "server-id-zero": ("rescue", set_host(server_id=0), "hosts.web-1.server_id", "positive integer"),
    "server-id-string": ("rescue", set_host(server_id="42"), "hosts.web-1.server_id", "positive integer"),
    "server-id-fraction": ("install", set_host(server_id=4.5), "hosts.web-1.server_id", "positive integer"),
    "ipv4-out-of-range": ("rescue", set_host(ipv4="256.1.1.1"), "hosts.web-1.ipv4", "IPv4 address"),
    "ipv4-is-ipv6": ("firstboot", set_host(ipv4="2001:db8::1"), "hosts.web-1.ipv4", "IPv4 address"),
    "duplicate-server": (
        "install",
        second_host(ipv4="127.0.0.2"),
        "hosts.web-2.server_id",
        "also given for host 'web-1'",
    ),
    "duplicate-address": ("rescue", second_host(server_id=43), "hosts.web-2.ipv4", "duplicate ipv4 '127.0.0.1'"),
    "hosts-empty": ("rescue", set_prop("hosts", {}), "hosts", "non-empty map"),
    "hosts-list": ("firstboot", set_prop("hosts", ["web-1"]), "hosts", "non-empty map"),
    "deadline-zero": ("rescue", set_prop("deadline_seconds", 0), "deadline_seconds", "positive number of seconds"),
    "deadline-nan": ("rescue", set_prop("deadline_seconds", float("nan")), "deadline_seconds", "(finite)"),
    "deadline-inf": ("install", set_prop("deadline_seconds", float("inf")), "deadline_seconds", "(finite)"),
    "deadline-negative": ("install", set_prop("deadline_seconds", -5), "deadline_seconds", "positive number"),
    "deadline-string": ("firstboot", set_prop("deadline_seconds", "600"), "deadline_seconds", "positive number"),
    "deadline-bool": ("rescue", set_prop("deadline_seconds", True), "deadline_seconds", "positive number"),
    "deploy-key-garbage": (
        "firstboot",
        set_prop("deploy_private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-key\n"),
        "deploy_private_key",
        "the value is not shown",
    ),
    "rescue-keys-empty": ("rescue", set_prop("rescue_ssh_key_ids", []), "rescue_ssh_key_ids", "SSH key IDs"),
    "rescue-key-name": (
        "install",
        set_prop("rescue_ssh_key_ids", ["laptop"]),
        "rescue_ssh_key_ids[0]",
        "Hetzner SSH key ID",
    ),
    "host-private-key-missing": (
        "install",
        set_prop("host_private_keys", {}),
        "host_private_keys.web-1",
        "the host key written into the seed",
    ),
    "host-private-key-garbage": (
        "install",
        set_prop("host_private_keys", {"web-1": "hunter2-not-a-key"}),
        "host_private_keys.web-1",
        "the value is not shown",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STEP_INPUTS))
def test_bad_step_input_is_rejected_naming_the_property(trapped: ProviderServer, case: str) -> None:
    step, mutate, prop, words = BAD_STEP_INPUTS[case]
    props = copy.deepcopy(step_props(step))
    mutate(props)
    found = failures(trapped, STEPS[step](), props)
    assert prop in found, found
    assert words in found[prop], found[prop]
    for secret in (DEPLOY.private_openssh, HOST.private_openssh, "hunter2-not-a-key", "not-a-key"):
        assert all(secret not in reason for reason in found.values())


BAD_OTHER_INPUTS: dict[str, tuple[Callable[[], Any], dict[str, Any], str, str]] = {
    "image-flake-spaces": (
        ImageProvider,
        {"flake": "has space", "attr": fixture_image_attr(), "nix_args": []},
        "flake",
        "flake reference",
    ),
    "image-attr-malformed": (
        ImageProvider,
        {"flake": f"path:{FIXTURE_FLAKE}", "attr": "x..y", "nix_args": []},
        "attr",
        "flake output attribute",
    ),
    "image-output-missing": (
        ImageProvider,
        {"flake": f"path:{FIXTURE_FLAKE}", "attr": "packages.x86_64-linux.nope", "nix_args": list(OFFLINE_NIX_ARGS)},
        "attr",
        "cannot evaluate",
    ),
    "image-nix-args-string": (
        ImageProvider,
        {"flake": f"path:{FIXTURE_FLAKE}", "attr": fixture_image_attr(), "nix_args": "--impure"},
        "nix_args",
        "list of strings",
    ),
    "host-key-host-not-a-name": (HostKeyProvider, {"host": "Web 1"}, "host", "not a valid hostname"),
    "host-key-adopt-not-a-key": (
        HostKeyProvider,
        {"host": "web-1", "adopt_private_key": "x"},
        "adopt_private_key",
        "private key",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OTHER_INPUTS))
def test_bad_image_and_keys_input_is_rejected(trapped: ProviderServer, case: str) -> None:
    provider, props, prop, words = BAD_OTHER_INPUTS[case]
    found = failures(trapped, provider(), props)
    assert prop in found, found
    assert words in found[prop], found[prop]


@pytest.fixture(scope="module")
def catalog_checked(sim: SimThread, trap: Trap, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderServer]:
    """Against the simulator's API (for its catalog), with SSH still pointed at the trap."""
    tmp = tmp_path_factory.mktemp("catalog")
    server = ProviderServer(project="nix-dabei", log_path=tmp / "provider.log", env={"XDG_CACHE_HOME": str(tmp)})
    server.configure({**sim.provider_config(), "nix-dabei:sshPort": str(trap.port)})
    yield server
    server.close()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("server_type", "cx99", "unknown server type 'cx99'; this project offers"),
        ("location", "mars1", "unknown location"),
    ],
)
def test_unknown_server_types_and_locations_are_rejected_from_the_catalog(
    sim: SimThread, catalog_checked: ProviderServer, field: str, value: str, words: str
) -> None:
    mark = sim.api.mark()
    found = failures(catalog_checked, RescueProvider(), step_props("rescue", {"web-1": host(**{field: value})}))
    assert words in found[f"hosts.web-1.{field}"], found
    assert "cx22" in found[f"hosts.web-1.{field}"] or "fsn1" in found[f"hosts.web-1.{field}"]
    assert list(found) == [f"hosts.web-1.{field}"], found
    # Only the read-only catalog, once per provider process.
    assert {(a.method, a.path) for a in sim.api.since(mark)} <= {("GET", "/server_types"), ("GET", "/locations")}


@pytest.mark.parametrize(("server_type", "location"), [("cax11", "ash"), ("cax11", "sin"), ("cx22", "hil")])
def test_a_server_type_its_location_does_not_offer_is_rejected_from_the_catalog(
    sim: SimThread, catalog_checked: ProviderServer, server_type: str, location: str
) -> None:
    """CAX (Arm64) and CX types are offered in Hetzner's EU locations only; the API refuses them elsewhere
    at create, after the other hosts' servers were created: the preview says so first."""
    hosts = {"web-1": host(server_type=server_type, location=location)}
    found = failures(catalog_checked, RescueProvider(), step_props("rescue", hosts))
    reason = found["hosts.web-1.location"]
    assert f"server type {server_type!r} is not offered in {location!r}" in reason, found
    assert "it is offered in fsn1, hel1, nbg1" in reason
    ok = {"web-1": host(server_type=server_type, location="hel1")}
    assert failures(catalog_checked, RescueProvider(), step_props("rescue", ok)) == {}


def config(**overrides: Any) -> dict[str, Any]:
    host_cfg = {"name": "web-1", "serverType": "cx22", "location": "fsn1", "flake": "github:o/r"}
    cfg: dict[str, Any] = {
        "image": {"flake": "github:o/r", "attr": "packages.x86_64-linux.image"},
        "hosts": [host_cfg],
        "deadlines": {"install": 600},
        "ssh_port": None,
    }
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return cfg


QUOTE = "quote it in Pulumi.<stack>.yaml"
# (overrides, config key named, words of the reason)
BAD_CONFIG: dict[str, tuple[dict[str, Any], str, str]] = {
    "server-type-number": (
        {"hosts.0.serverType": 22},
        "nix-dabei:hosts[0].serverType",
        f"the number 22; {QUOTE} ('22')",
    ),
    "flake-bool": ({"hosts.0.flake": True}, "nix-dabei:hosts[0].flake", "the boolean true; " + QUOTE),
    "ssh-keys-string": ({"hosts.0.sshKeys": "laptop"}, "nix-dabei:hosts[0].sshKeys", "expected a list"),
    "ssh-key-bool": ({"hosts.0.sshKeys": [True]}, "nix-dabei:hosts[0].sshKeys[0]", f"key named 'true', {QUOTE}"),
    "ssh-key-float": ({"hosts.0.sshKeys": [1.5]}, "nix-dabei:hosts[0].sshKeys[0]", "a key ID, got the number 1.5"),
    "labels-list": ({"hosts.0.labels": ["a"]}, "nix-dabei:hosts[0].labels", "map of label names"),
    "label-float": ({"hosts.0.labels": {"v": 1.10}}, "nix-dabei:hosts[0].labels.v", f"number 1.1; {QUOTE}"),
    "firewall-id-word": ({"hosts.0.firewallIds": ["web"]}, "nix-dabei:hosts[0].firewallIds[0]", "firewall ID"),
    "deadline-duration": ({"deadlines.install": "10m"}, "nix-dabei:deadlines.install", "number of seconds"),
    "deadline-bool": ({"deadlines.install": True}, "nix-dabei:deadlines.install", "number of seconds"),
    "deadline-nan": ({"deadlines.install": "nan"}, "nix-dabei:deadlines.install", "finite number of seconds"),
    "deadline-inf": ({"deadlines.rescue": "inf"}, "nix-dabei:deadlines.rescue", "finite number of seconds"),
    "unknown-host-key": ({"hosts.0.sshkeys": ["laptop"]}, "nix-dabei:hosts[0].sshkeys", "unknown key"),
    "hosts-object": ({"hosts": {"web-1": {}}}, "nix-dabei:hosts", "non-empty list"),
    "ssh-port-word": ({"ssh_port": "ssh"}, "nix-dabei:sshPort", "port number"),
    "ssh-port-range": ({"ssh_port": 70000}, "nix-dabei:sshPort", "between 1 and 65535"),
    "image-not-object": ({"image": "github:o/r"}, "nix-dabei:image", "expected an object"),
    "nix-arg-object": ({"image.nixArgs": [{"a": 1}]}, "nix-dabei:image.nixArgs[0]", "expected a string"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_wrong_types_in_stack_config_are_rejected_naming_the_key(case: str) -> None:
    overrides, key, words = BAD_CONFIG[case]
    cfg = config(**overrides)
    with pytest.raises(InvalidArgs) as exc:
        fleet_args_from_config(cfg["image"], cfg["hosts"], cfg["deadlines"], cfg["ssh_port"])
    found = dict(exc.value.problems)
    assert key in found, found
    assert words in found[key], found[key]


def test_typed_config_values_mean_what_was_typed() -> None:
    """What `pulumi config set --path` stores for `123456`, `2`, `true`, and what a YAML file or a top-level
    key (always a string) holds: each taken as the user meant it."""
    cfg = config(
        **{
            "hosts.0.sshKeys": [123456, "My ssh key", "me@laptop"],
            "hosts.0.labels": {"tier": 2, "managed": True, "off": False, "empty": ""},
            "hosts.0.firewallIds": ["123", 456],
            "deadlines": {"install": "600", "rescue": 900, "firstboot": "1.5e3"},
            "image.nixArgs": ["--cores", 2, "--option", "sandbox", False],
            "ssh_port": "2222",
        }
    )
    args = fleet_args_from_config(cfg["image"], cfg["hosts"], cfg["deadlines"], cfg["ssh_port"])
    host = args.hosts[0]
    assert host.ssh_keys == [123456, "My ssh key", "me@laptop"]
    assert host.labels == {"tier": "2", "managed": "true", "off": "false", "empty": ""}
    assert host.firewall_ids == [123, 456]
    assert (args.deadlines.install, args.deadlines.rescue, args.deadlines.firstboot) == (600.0, 900.0, 1500.0)
    assert args.image.nix_args == ["--cores", "2", "--option", "sandbox", "false"]
    assert args.ssh_port == 2222


def test_the_config_the_bad_cases_start_from_is_valid() -> None:
    cfg = config()
    args = fleet_args_from_config(cfg["image"], cfg["hosts"], cfg["deadlines"], cfg["ssh_port"])
    assert args.hosts[0].name == "web-1"
