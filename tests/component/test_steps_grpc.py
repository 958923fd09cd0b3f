"""Each step provider through the real dynamic provider server (`python -m pulumi.dynamic`, gRPC).

These calls need no Hetzner API: check, diff, the keys step, the image step with a real `nix build`, and
updates that the reinstall policy holds back. The full create paths run in tests/e2e against the simulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dabei_component.demo import FIXTURE_FLAKE, fixture_image_attr
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.keys import public_key_of
from dabei_component.provider_server import ProviderServer
from dabei_component.steps.firstboot import FirstBootProvider
from dabei_component.steps.image import ImageProvider
from dabei_component.steps.install import InstallProvider
from dabei_component.steps.keys import SshKeysProvider
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
        "reinstall": "on-image-change",
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


def test_keys_step_creates_and_keeps_identities(server: ProviderServer) -> None:
    p = server.with_provider(SshKeysProvider(), {"host_names": ["a", "b"]})
    checked = server.check(URN, {}, p)
    assert checked.failures == []
    _id, outs = server.create(URN, checked.inputs)
    assert sorted(outs["host_public_keys"]) == ["a", "b"]
    for name, private in outs["host_private_keys"].items():
        assert public_key_of(private) == outs["host_public_keys"][name]
    assert public_key_of(outs["deploy_private_key"]) == outs["deploy_public_key"]
    assert len(set(outs["host_public_keys"].values())) == 2

    news = server.with_provider(SshKeysProvider(), {"host_names": ["a", "b", "c"]})
    assert server.diff(URN, _id, outs, news) is True
    updated = server.update(URN, _id, outs, news)
    assert updated["host_public_keys"]["a"] == outs["host_public_keys"]["a"]
    assert updated["deploy_private_key"] == outs["deploy_private_key"]
    assert "c" in updated["host_public_keys"]
    assert server.diff(URN, _id, updated, news) is False


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
    assert server.diff(URN, _id, outs, checked.inputs) is False


def test_flake_change_touches_only_first_boot(server: ProviderServer) -> None:
    old = {"hosts": {"web-1": {**host(), "rescue_boot_id": "b1", "installed_image": "/nix/store/aaaa-image"}}}
    new_hosts = {"web-1": host(flake="github:o/r?rev=2")}
    assert server.diff(URN, "id", old, props(server, RescueProvider(), new_hosts)) is False
    assert server.diff(URN, "id", old, props(server, InstallProvider(), new_hosts, image={})) is False
    fb_hosts = {
        "web-1": {**host(flake="github:o/r?rev=2"), "rescue_boot_id": "b1", "installed_image": "/nix/store/aaaa-image"}
    }
    assert server.diff(URN, "id", old, props(server, FirstBootProvider(), fb_hosts)) is True


def test_new_image_under_policy_never_shows_but_does_not_act(server: ProviderServer) -> None:
    recorded = {**host(reinstall="never"), "rescue_host_key": "ssh-ed25519 KEY", "rescue_boot_id": "b1"}
    olds = {"hosts": {"web-1": recorded}, "deadline_seconds": 60}
    news = props(server, RescueProvider(), {"web-1": host(reinstall="never", image="/nix/store/bbbb-image")})
    assert server.diff(URN, "id", olds, news) is True
    # The update reaches no API (the endpoint is dead) and keeps the installed image in the outputs,
    # so the next preview shows the pending image again.
    outs = server.update(URN, "id", olds, news)
    assert outs["hosts"]["web-1"]["image"] == "/nix/store/aaaa-image"
    assert outs["hosts"]["web-1"]["rescue_host_key"] == "ssh-ed25519 KEY"
    assert server.diff(URN, "id", outs, news) is True


def test_unknown_values_at_preview_count_as_changes(server: ProviderServer) -> None:
    from dabei_component.steps.base import UNKNOWN

    old = {"hosts": {"web-1": host()}}
    news = props(server, RescueProvider(), {"web-1": host(server_id=UNKNOWN)})
    assert server.diff(URN, "id", old, news) is True
