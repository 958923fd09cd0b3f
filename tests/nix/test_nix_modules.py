"""The NixOS modules' own definitions, evaluated without nixpkgs (tests/nix/harness/eval-module.nix):
unit ordering, the network matches, the image facts, the arm64 console, the program's configuration."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dabei_firstboot.config import config_from_dict

from .conftest import PROJECT, nix_eval

HARNESS = PROJECT / "tests" / "nix" / "harness" / "eval-module.nix"
MODULES = PROJECT / "nix" / "modules"
LAYOUT = PROJECT / "nix" / "lib" / "image-layout.nix"


def module(name: str, attr: str, **args: str) -> Any:
    extra = " ".join(f"{key} = {value};" for key, value in args.items())
    return nix_eval(f"(import {HARNESS} {{ module = {MODULES / name}; {extra} }}).{attr}")


def test_seed_reads_the_partition_table_before_it_grows() -> None:
    """nix-dabei-grow rewrites the GPT (sgdisk, growpart) that nix-dabei-seed parses: ordered after it."""
    grow = module("zfs-image.nix", "config.systemd.services.nix-dabei-grow")
    assert grow["condition"] is True
    assert "nix-dabei-seed.service" in grow["content"]["after"]
    seed = module("firstboot.nix", "config.content.systemd.services.nix-dabei-seed")
    assert "nix-dabei-grow.service" not in seed.get("after", [])
    assert {"sshd.service", "sshd-keygen.service"} <= set(seed["before"])
    # No gate on seed.json: a seed whose wipe failed is found and wiped on a later boot.
    assert "ConditionPathExists" not in seed.get("unitConfig", {})
    # The program expands the image's pool (the option path the module really reads).
    program = json.loads(module("firstboot.nix", 'config.content.environment.etc."nix-dabei/config.json".text'))
    assert program["grow_pool"] == "rpool"
    # Growing runs on every boot (a resize makes the disk bigger under an installed system), by the program.
    assert "ConditionPathExists" not in grow["content"].get("unitConfig", {})
    assert grow["content"]["serviceConfig"]["ExecStart"].endswith(" grow")


def test_network_unit_runs_early_without_default_dependencies() -> None:
    unit = module("firstboot.nix", "config.content.systemd.services.nix-dabei-network")
    assert unit["unitConfig"]["DefaultDependencies"] is False
    assert "systemd-networkd.service" in unit["before"] and "systemd-networkd.service" in unit["wantedBy"]
    assert unit["after"] == ["local-fs.target"]
    assert "shutdown.target" in unit["conflicts"] and "shutdown.target" in unit["before"]


def test_identity_lives_on_the_persistent_dataset() -> None:
    """Host key and root's keys are read by sshd from /var (safe/var), which a rollback of local/root to
    @blank does not touch; the paths are the ones the program writes."""
    ssh = module("firstboot.nix", "config.content.services.openssh")
    assert ssh["hostKeys"] == [{"type": "ed25519", "path": "/var/lib/nix-dabei/ssh/ssh_host_ed25519_key"}]
    assert ssh["authorizedKeysFiles"] == ["/var/lib/nix-dabei/ssh/authorized_keys.d/%u"]
    datasets = module("zfs-image.nix", "options.nix-dabei.datasets.default")
    assert datasets["safe/var"]["mountpoint"] == "/var" and datasets["local/root"]["mountpoint"] == "/"


def test_program_configuration_is_accepted_by_the_program() -> None:
    """Every key the module writes to /etc/nix-dabei/config.json is one the program knows."""
    text = module("firstboot.nix", 'config.content.environment.etc."nix-dabei/config.json".text')
    config = config_from_dict(json.loads(text), "module")
    assert config.switch_wait_command == ("/nix/store/stand-in-nix-dabei-wait-for-switch",)
    assert config.network_reload_command == ("/nix/store/stand-in-systemd/bin/networkctl", "reload")
    # `nix-dabei receive --inputs`: the system's Nix and zstd by store path (an SSH session's PATH aside).
    assert config.nix_store_command[0].endswith("/bin/nix-store") and len(config.nix_store_command) == 1
    assert config.decompress_command[0].endswith("/bin/zstd") and config.decompress_command[1:] == ("-dc",)


@pytest.mark.parametrize(
    "name", ["poolName", "poolProperties", "datasetProperties", "datasets", "blankSnapshot", "espSizeMiB",
             "bootMode", "bootDevice", "hostId"],
)  # fmt: skip
def test_image_facts_are_read_only(name: str) -> None:
    """A readOnly option with a default refuses any other definition (nixpkgs lib/modules.nix)."""
    option = module("zfs-image.nix", f"options.nix-dabei.{name}")
    assert option["readOnly"] is True, option


def test_image_facts_come_from_the_layout_and_build_options_stay_settable() -> None:
    options = module("zfs-image.nix", "options.nix-dabei")
    assert options["hostId"]["default"] == "da8e1001" and options["poolName"]["default"] == "rpool"
    assert options["imageSizeMiB"].get("readOnly", False) is False
    assert options["growOnBoot"].get("readOnly", False) is False
    assert module("zfs-image.nix", "config.networking.hostId") == "da8e1001"


def test_forced_host_id_is_refused() -> None:
    ok = module("zfs-image.nix", "config.assertions")
    assert all(a["assertion"] for a in ok)
    forced = module("zfs-image.nix", "config.assertions", nixpkgsConfig='{ networking.hostId = "deadbeef"; }')
    failed = [a["message"] for a in forced if not a["assertion"]]
    assert len(failed) == 1 and "must stay da8e1001" in failed[0]


@pytest.mark.parametrize(
    ("system", "mode", "devices"),
    [("x86_64-linux", "bios+uefi", ["/dev/sda"]), ("aarch64-linux", "uefi", ["nodev"])],
)
def test_boot_mode_per_architecture(system: str, mode: str, devices: list[str]) -> None:
    assert module("zfs-image.nix", "options.nix-dabei.bootMode.default", system=f'"{system}"') == mode
    grub = module("zfs-image.nix", "config.boot.loader.grub", system=f'"{system}"')
    assert grub["devices"] == devices


def test_boot_partition_keeps_a_bounded_number_of_generations() -> None:
    limit = module("zfs-image.nix", "config.boot.loader.grub.configurationLimit")
    assert limit["_type"] == "override" and limit["priority"] == 1000  # mkDefault: a host may choose another
    assert limit["content"] == 5


@pytest.mark.parametrize(("system", "on"), [("aarch64-linux", True), ("x86_64-linux", False)])
def test_arm_console_on_the_screen(system: str, on: bool) -> None:
    params = module("hetzner-hardware.nix", "config.boot.kernelParams", system=f'"{system}"')
    initrd = module("hetzner-hardware.nix", "config.boot.initrd.kernelModules", system=f'"{system}"')
    assert (params["condition"], initrd["condition"]) == (on, on)
    assert params["content"] == ["console=tty"] and initrd["content"] == ["virtio_gpu"]


def test_network_matches_leave_virtual_devices_alone() -> None:
    networks = "config.content.systemd.network.networks"
    catch_all = module("hetzner-networking.nix", f'{networks}."99-nix-dabei-ether"')
    assert catch_all["matchConfig"] == {"Type": "ether", "Driver": "virtio_net"}
    # No instance data at evaluation time: the program writes the uplink file at runtime.
    assert module("hetzner-networking.nix", f'{networks}."10-nix-dabei-uplink".condition') is False
    instance = f'(import {PROJECT / "nix/lib/instance-data.nix"}).fromMetadata {{ hostname = "a"; network-config.config = [ {{ name = "eth0"; mac_address = "96:00:00:2B:1C:9E"; subnets = [ {{ type = "dhcp"; }} ]; }} ]; }}'  # noqa: E501
    uplink = module(
        "hetzner-networking.nix",
        'config.content.systemd.network.networks."10-nix-dabei-uplink"',
        settings=f"{{ nix-dabei.instance = {instance}; }}",
    )
    assert uplink["condition"] is True
    assert uplink["content"]["matchConfig"] == {"PermanentMACAddress": "96:00:00:2b:1c:9e"}


def test_fully_qualified_name_gives_host_name_and_domain() -> None:
    meta = (
        '{ hostname = "web-1.example.com"; network-config.config = [ { name = "eth0"; '
        'mac_address = "96:00:00:2b:1c:9e"; subnets = [ { type = "dhcp"; } ]; } ]; }'
    )
    networking = module("instance-data.nix", "config.networking", settings=f"{{ nix-dabei.instanceData = {meta}; }}")
    assert networking["hostName"]["content"]["content"] == "web-1"
    assert networking["domain"]["content"]["content"] == "example.com"
