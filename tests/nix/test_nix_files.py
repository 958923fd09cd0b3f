"""The Nix side without nixpkgs: every .nix file parses, the pure instance-data functions evaluate on both
metadata layouts, and the fixture image flake really builds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dabei_firstboot import seed as seedlib
from dabei_firstboot.metadata import instance_data

from .conftest import NIX_OPTIONS, PROJECT, SHARED, nix_eval, older_layout

NIX_FILES = sorted((PROJECT / "nix").rglob("*.nix"))
INSTANCE_LIB = PROJECT / "nix" / "lib" / "instance-data.nix"


def test_there_are_nix_files() -> None:
    names = {p.relative_to(PROJECT / "nix").as_posix() for p in NIX_FILES}
    assert {"flake.nix", "lib/instance-data.nix", "modules/default.nix", "fixtures/image/flake.nix"} <= names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(PROJECT / "nix").as_posix())
def test_nix_file_parses(path: Path) -> None:
    result = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_flake_lock_pins_nixpkgs() -> None:
    lock = json.loads((PROJECT / "nix" / "flake.lock").read_text())
    node = lock["nodes"]["nixpkgs"]["locked"]
    assert len(node["rev"]) == 40 and node["narHash"].startswith("sha256-")
    assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}
    # The lock follows the branch flake.nix names, and nix/README.md states it as the supported release.
    ref = lock["nodes"]["nixpkgs"]["original"]["ref"]
    assert f'inputs.nixpkgs.url = "github:NixOS/nixpkgs/{ref}";' in (PROJECT / "nix" / "flake.nix").read_text()
    assert f"**{ref}**" in (PROJECT / "nix" / "README.md").read_text()


def test_instance_data_current_layout() -> None:
    fixture = (SHARED / "fixtures" / "hetzner-metadata.json").resolve()
    data = nix_eval(f"(import {INSTANCE_LIB}).fromFile {fixture}")
    assert data["hostname"] == "installer-test"
    assert data["macAddress"] == "96:00:01:79:bc:40"
    assert data["ipv4Dhcp"] is True
    assert data["ipv6"] == {
        "address": "2a01:4f8:c0c:7bc5::1",
        "prefixLength": 64,
        "gateway": "fe80::1",
        "nameservers": ["2a01:4ff:ff00::add:2", "2a01:4ff:ff00::add:1"],
    }
    assert data["publicIPv4"] == "159.69.206.150"


def test_instance_data_older_layout_and_networkd(tmp_path: Path) -> None:
    path = tmp_path / "older.json"
    path.write_text(json.dumps(older_layout()))
    data = nix_eval(f"(import {INSTANCE_LIB}).fromFile {path}")
    assert data["hostname"] == "web-2"
    assert data["macAddress"] == "96:00:00:2b:1c:9e"  # from eth0: the eth0:0 entry has none
    assert data["ipv6"]["address"] == "2a01:4f9:c010:8a3c::1"
    assert data["ipv6"]["gateway"] == "fe80::1"  # from the default route
    network = nix_eval(f"let l = import {INSTANCE_LIB}; in l.networkdNetwork (l.fromFile {path})")
    assert network == {
        "matchConfig": {"PermanentMACAddress": "96:00:00:2b:1c:9e"},
        "networkConfig": {"DHCP": "ipv4", "IPv6AcceptRA": False},
        "address": ["2a01:4f9:c010:8a3c::1/64"],
        "dns": ["2a01:4ff:ff00::add:1", "2a01:4ff:ff00::add:2"],
        "routes": [{"Gateway": "fe80::1", "GatewayOnLink": True}],
    }


def test_nix_and_python_agree_on_reduced_instance_data(tmp_path: Path) -> None:
    """The program's instance-data.json evaluates to the same facts as the raw metadata."""
    for number, meta in enumerate(
        [json.loads((SHARED / "fixtures" / "hetzner-metadata.json").read_text()), older_layout()]
    ):
        raw = tmp_path / f"raw{number}.json"
        reduced = tmp_path / f"reduced{number}.json"
        raw.write_text(json.dumps(meta))
        reduced.write_text(json.dumps(instance_data(meta)))
        from_raw = nix_eval(f"(import {INSTANCE_LIB}).fromFile {raw}")
        from_reduced = nix_eval(f"(import {INSTANCE_LIB}).fromFile {reduced}")
        assert from_raw == from_reduced


def test_instance_data_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"hostname": "x", "network-config": {"config": [{"name": "eth0", "subnets": []}]}}))
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--expr", f"(import {INSTANCE_LIB}).fromFile {path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "has no public IPv4 (dhcp) or IPv6 (static) subnet" in result.stderr


def test_fixture_image_builds(tmp_path: Path) -> None:
    source = tmp_path / "image"
    shutil.copytree(PROJECT / "nix" / "fixtures" / "image", source)
    out_link = tmp_path / "result"
    build = subprocess.run(
        ["nix", "build", *NIX_OPTIONS, f"path:{source}#packages.x86_64-linux.default", "--out-link", str(out_link)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    image = out_link / "nixos.img"
    assert image.stat().st_size == 64 * 1024 * 1024
    names = [p["name"] for p in seedlib.list_partitions(image)]
    assert names == ["bios-boot", "ESP", "dabei-seed", "zfs"]
    _, size = seedlib.find_seed_partition(image)
    assert size == 1024 * 1024
    with open(image, "rb") as handle:
        handle.seek(seedlib.list_partitions(image)[3]["offset"])
        assert handle.read(40).startswith(b"nix-dabei fixture image for x86_64-linux")
    # The same layout is declared for aarch64 (evaluated only: this machine cannot build it).
    drv = subprocess.run(
        ["nix", "eval", *NIX_OPTIONS, "--raw", f"path:{source}#packages.aarch64-linux.default.system"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert drv.returncode == 0 and drv.stdout == "aarch64-linux", drv.stderr
