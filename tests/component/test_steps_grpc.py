"""Each step provider through the real dynamic provider server (`python -m pulumi.dynamic`, gRPC).

These calls need no Hetzner API: check, diff, the key steps, the image step with a real `nix build`, and
what decides whether a host acts (reinstall requests, values not known at preview). The full create paths
run in tests/e2e against the simulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pulumi.output import Unknown

from dabei_component.demo import FIXTURE_FLAKE, fixture_image_attr
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.keys import generate_ssh_keypair, public_key_of
from dabei_component.provider_server import ProviderServer
from dabei_component.steps.firstboot import FirstBootProvider
from dabei_component.steps.image import ImageProvider
from dabei_component.steps.install import InstallProvider
from dabei_component.steps.keys import HostKeyProvider, SshKeysProvider
from dabei_component.steps.rescue import RescueProvider

URN = "urn:pulumi:test::nix-dabei::pulumi-python:dynamic:Resource::step"
TOKEN = "t" * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderServer]:
    tmp = tmp_path_factory.mktemp("provider")
    srv = ProviderServer(project="nix-dabei", log_path=tmp / "provider.log", env={"XDG_CACHE_HOME": str(tmp)})
    # An endpoint nothing listens on: none of these tests may reach an API.
    srv.configure({"hcloud:token": TOKEN, "hcloud:endpoint": "http://127.0.0.1:9/v1", "nix-dabei:sshPort": "2222"})
    yield srv
    srv.close()
    assert TOKEN not in (tmp / "provider.log").read_text()


def host(**overrides: Any) -> dict[str, Any]:
    base = {
        "server_id": 42,
        "ipv4": "127.0.0.9",
        "image": "/nix/store/aaaa-image",
        "reinstall": None,
        "disk": "/dev/sda",
        "flake": "github:o/r",
        "hostname": "web-1",
        "host_public_key": "ssh-ed25519 AAAA",
        "authorized_keys": ["ssh-ed25519 BBBB"],
    }
    return {**base, **overrides}


def props(server: ProviderServer, provider: Any, hosts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return server.with_provider(
        provider, {"hosts": hosts, "deploy_private_key": "PRIVATE", "deadline_seconds": 60, **extra}
    )


def test_keys_step_creates_the_deploy_key_once(server: ProviderServer) -> None:
    p = server.with_provider(SshKeysProvider(), {})
    checked = server.check(URN, {}, p)
    assert checked.failures == []
    _id, outs = server.create(URN, checked.inputs)
    assert public_key_of(outs["deploy_private_key"]) == outs["deploy_public_key"]
    # Nothing in the inputs changes a generated key: a stack of an earlier release (host names) neither.
    assert server.diff(URN, _id, outs, server.with_provider(SshKeysProvider(), {})).changes is False
    legacy = server.with_provider(SshKeysProvider(), {"host_names": ["a", "b", "c"]})
    assert server.diff(URN, _id, {**outs, "host_names": ["a", "b"]}, legacy).changes is False


def test_host_key_is_generated_or_adopted_and_never_changes(server: ProviderServer) -> None:
    _id, fresh = server.create(URN, server.with_provider(HostKeyProvider(), {"host": "web-1"}))
    assert public_key_of(fresh["private_key"]) == fresh["public_key"]
    assert fresh["adopted"] is False
    recorded = generate_ssh_keypair()
    adopt = server.with_provider(HostKeyProvider(), {"host": "web-2", "adopt_private_key": recorded.private_openssh})
    assert server.check(URN, {}, adopt).failures == []
    _id, adopted = server.create(URN, adopt)
    assert (adopted["private_key"], adopted["public_key"]) == (recorded.private_openssh, recorded.public)
    assert server.diff(URN, _id, adopted, server.with_provider(HostKeyProvider(), {"host": "web-2"})).changes is False
    bad = server.check(URN, {}, server.with_provider(HostKeyProvider(), {"host": "web-2", "adopt_private_key": "x"}))
    assert [f for f, _ in bad.failures] == ["adopt_private_key"]


def test_image_step_builds_once_and_reports_content_address(server: ProviderServer, tmp_path: Path) -> None:
    inputs = {"flake": f"path:{FIXTURE_FLAKE}", "attr": fixture_image_attr(), "nix_args": list(OFFLINE_NIX_ARGS)}
    checked = server.check(URN, {}, server.with_provider(ImageProvider(), inputs))
    assert checked.failures == []
    out_path = checked.inputs["out_path"]
    assert out_path.startswith("/nix/store/")
    _id, outs = server.create(URN, checked.inputs)
    assert outs["out_path"] == out_path
    assert outs["raw_size"] == Path(outs["image_file"]).stat().st_size
    assert Path(outs["compressed_path"]).stat().st_size == outs["compressed_size"]
    assert outs["seed_size"] == 1024 * 1024
    # Same inputs: no change, so no rebuild and no recompression.
    assert server.diff(URN, _id, outs, checked.inputs).changes is False


def test_flake_change_touches_only_first_boot(server: ProviderServer) -> None:
    old = {"hosts": {"web-1": {**host(), "rescue_boot_id": "b1", "installed_image": "/nix/store/aaaa-image"}}}
    new_hosts = {"web-1": host(flake="github:o/r?rev=2")}
    assert server.diff(URN, "id", old, props(server, RescueProvider(), new_hosts)).changes is False
    assert server.diff(URN, "id", old, props(server, InstallProvider(), new_hosts, image={})).changes is False
    fb_hosts = {
        "web-1": {**host(flake="github:o/r?rev=2"), "rescue_boot_id": "b1", "installed_image": "/nix/store/aaaa-image"}
    }
    assert server.diff(URN, "id", old, props(server, FirstBootProvider(), fb_hosts)).changes is True


def test_new_image_does_not_touch_an_installed_host(server: ProviderServer) -> None:
    recorded = {**host(), "rescue_host_key": "ssh-ed25519 KEY", "rescue_boot_id": "b1"}
    olds = {"hosts": {"web-1": recorded}, "deadline_seconds": 60}
    news = props(server, RescueProvider(), {"web-1": host(image="/nix/store/bbbb-image")})
    assert server.diff(URN, "id", olds, news).changes is False
    # Removing an earlier request is no request either.
    news = props(server, RescueProvider(), {"web-1": host(reinstall=None)})
    assert server.diff(URN, "id", {"hosts": {"web-1": {**recorded, "reinstall": "r1"}}}, news).changes is False


def test_a_new_reinstall_request_acts(server: ProviderServer) -> None:
    recorded = {**host(), "reinstall": "r1", "rescue_host_key": "ssh-ed25519 KEY", "rescue_boot_id": "b1"}
    olds = {"hosts": {"web-1": recorded}, "deadline_seconds": 60}
    for provider in (RescueProvider(), InstallProvider()):
        assert server.diff(URN, "id", olds, props(server, provider, {"web-1": host(reinstall="r2")})).changes is True
        assert server.diff(URN, "id", olds, props(server, provider, {"web-1": host(reinstall="r1")})).changes is False


@pytest.mark.parametrize(
    "unknown_at",
    [
        lambda h: {**h, "server_id": Unknown()},
        lambda h: {**h, "reinstall": Unknown()},
        lambda h: Unknown(),
    ],
)
def test_an_unknown_deciding_value_at_preview_counts_as_a_change(server: ProviderServer, unknown_at: Any) -> None:
    old = {"hosts": {"web-1": host()}}
    news = props(server, RescueProvider(), {"web-1": unknown_at(host())})
    assert server.diff(URN, "id", old, news).changes is True


def test_unknown_values_that_decide_nothing_are_no_change(server: ProviderServer) -> None:
    """A preview that adds a host or builds a new image: keys and paths not known yet, at any depth, pass
    check (they are checked on the run that knows them) and act on nothing, unless they decide what a
    step does (root's authorized keys, which first boot sets on a running host)."""
    old = {"hosts": {"web-1": host()}}
    unknown_host = {**host(), "image": Unknown(), "host_public_key": Unknown(), "authorized_keys": [Unknown()]}
    for provider, extra, acts in (
        (RescueProvider(), {}, False),
        (InstallProvider(), {"image": Unknown(), "host_private_keys": {"web-1": Unknown()}}, False),
        (FirstBootProvider(), {}, True),
    ):
        news = {**props(server, provider, {"web-1": unknown_host}, **extra), "deploy_private_key": Unknown()}
        assert server.check(URN, old, news).failures == [], provider
        assert server.diff(URN, "id", old, news).changes is acts, provider
