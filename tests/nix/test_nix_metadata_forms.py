"""Every address and name read from the metadata, in the forms real answers take, through the first-boot
program (dabei_firstboot.metadata) and nix/lib/instance-data.nix alike: both normalize to the same facts,
and both refuse what cannot be normalized, naming the key."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dabei_firstboot.metadata import MetadataUnusable, instance_data
from dabei_firstboot.network import render_networkd

from .conftest import PROJECT, current_layout, older_layout

INSTANCE_LIB = PROJECT / "nix" / "lib" / "instance-data.nix"
Meta = dict[str, Any]


def nix_facts(tmp_path: Path, doc: Any, name: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", f"(import {INSTANCE_LIB}).fromFile {path}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def v6_subnet(meta: Meta) -> dict[str, Any]:
    return meta["network-config"]["config"][0]["subnets"][1]


def older_v6(meta: Meta) -> dict[str, Any]:
    return meta["network-config"]["config"][1]["subnets"][0]


def change(layout: Callable[[], Meta], edit: Callable[[Meta], None]) -> Meta:
    meta = copy.deepcopy(layout())
    edit(meta)
    return meta


def set_in(target: Callable[[Meta], dict[str, Any]], **values: Any) -> Callable[[Meta], None]:
    return lambda meta: target(meta).update(values)


def drop_in(target: Callable[[Meta], dict[str, Any]], *keys: str) -> Callable[[Meta], None]:
    def edit(meta: Meta) -> None:
        for key in keys:
            target(meta).pop(key, None)

    return edit


def top(meta: Meta) -> dict[str, Any]:
    return meta


def eth0(meta: Meta) -> dict[str, Any]:
    return meta["network-config"]["config"][0]


# (id, metadata, the facts expected in the Nix naming: a subset of the whole result)
ACCEPTED: list[tuple[str, Meta, dict[str, Any]]] = [
    (
        "older-route-gateway-with-zone",
        change(older_layout, lambda m: older_v6(m)["routes"][0].update(gateway="fe80::1%enp1s0")),
        {"ipv6": {"gateway": "fe80::1"}},
    ),
    (
        "gateway-with-zone-and-upper-case",
        change(current_layout, set_in(v6_subnet, gateway="FE80:0:0:0:0:0:0:1%eth0")),
        {"ipv6": {"gateway": "fe80::1"}},
    ),
    (
        "address-upper-case-uncompressed",
        change(current_layout, set_in(v6_subnet, address="2A01:04F8:0C0C:7BC5:0000:0000:0000:0001/64")),
        {"ipv6": {"address": "2a01:4f8:c0c:7bc5::1", "prefixLength": 64}},
    ),
    (
        "address-with-zone-and-prefix",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1%eth0/64")),
        {"ipv6": {"address": "2a01:4f8:c0c:7bc5::1", "prefixLength": 64}},
    ),
    (
        "netmask-as-ipv6-mask",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1", netmask="ffff:ffff:ffff:ff00::")),
        {"ipv6": {"prefixLength": 56}},
    ),
    (
        "netmask-as-integer",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1", netmask=48)),
        {"ipv6": {"prefixLength": 48}},
    ),
    (
        "prefix-as-string-with-slash",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1", prefix="/64")),
        {"ipv6": {"prefixLength": 64}},
    ),
    (
        "address-without-prefix",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1")),
        {"ipv6": {"prefixLength": 64}},
    ),
    (
        "no-gateway-at-all",
        change(current_layout, drop_in(v6_subnet, "gateway")),
        {"ipv6": {"gateway": "fe80::1"}},
    ),
    (
        "longest-zero-run-compressed",
        change(current_layout, set_in(v6_subnet, address="2a01:0:0:1:0:0:0:1/64")),
        {"ipv6": {"address": "2a01:0:0:1::1"}},
    ),
    (
        "nameservers-upper-case-zone-and-ipv4",
        change(
            current_layout, set_in(v6_subnet, dns_nameservers=["2A01:4FF:FF00::ADD:2", "fe80::53%eth0", "185.12.64.1"])
        ),
        {"ipv6": {"nameservers": ["2a01:4ff:ff00::add:2", "fe80::53", "185.12.64.1"]}},
    ),
    (
        "mac-upper-case",
        change(current_layout, set_in(eth0, mac_address="96:00:01:79:BC:40")),
        {"macAddress": "96:00:01:79:bc:40"},
    ),
    (
        "mac-with-dashes",
        change(current_layout, set_in(eth0, mac_address="96-00-01-79-bc-40")),
        {"macAddress": "96:00:01:79:bc:40"},
    ),
    (
        "fully-qualified-hostname",
        change(current_layout, set_in(top, hostname="web-1.example.com")),
        {"hostname": "web-1.example.com", "hostName": "web-1", "domain": "example.com"},
    ),
    (
        "hostname-with-trailing-dot",
        change(current_layout, set_in(top, hostname="web-1.example.com.")),
        {"hostname": "web-1.example.com", "hostName": "web-1", "domain": "example.com"},
    ),
    (
        "ipv4-only-server",
        change(current_layout, lambda m: eth0(m)["subnets"].pop(1)),
        {"ipv6": None, "ipv4Dhcp": True},
    ),
    (
        "ipv6-only-server",
        change(current_layout, lambda m: (eth0(m)["subnets"].pop(0), m.update({"public-ipv4": ""}))),
        {"ipv4Dhcp": False, "publicIPv4": None, "ipv6": {"address": "2a01:4f8:c0c:7bc5::1"}},
    ),
]

# (id, metadata, the phrase both implementations must say)
REFUSED: list[tuple[str, Meta, str]] = [
    (
        "no-interfaces",
        change(current_layout, lambda m: m.update({"network-config": {"version": 1, "config": []}})),
        "'network-config.config': lists no network interface",
    ),
    ("no-network-config", change(current_layout, drop_in(top, "network-config")), "'network-config': missing"),
    (
        "network-config-version-2",
        change(current_layout, lambda m: m["network-config"].update(version=2)),
        "'network-config.version': 2 is not supported",
    ),
    (
        "only-dhcp6",
        change(current_layout, lambda m: eth0(m).update(subnets=[{"type": "dhcp6"}])),
        "has no public IPv4 (dhcp) or IPv6 (static) subnet",
    ),
    ("no-mac", change(current_layout, drop_in(eth0, "mac_address")), "entry 'eth0': has no mac_address"),
    ("short-mac", change(current_layout, set_in(eth0, mac_address="96:00:01:79:bc")), "is not a MAC address"),
    (
        "bad-gateway",
        change(current_layout, set_in(v6_subnet, gateway="fe80::g")),
        "subnet.gateway: 'fe80::g' is not an IPv6 address",
    ),
    (
        "bad-route-gateway",
        change(older_layout, lambda m: older_v6(m)["routes"][0].update(gateway="fe80:::1")),
        "subnet.routes[default].gateway: 'fe80:::1' is not an IPv6 address",
    ),
    (
        "two-double-colons",
        change(current_layout, set_in(v6_subnet, address="2a01::4f8::1/64")),
        "subnet.address: '2a01::4f8::1' is not an IPv6 address",
    ),
    (
        "prefix-too-long",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1/129")),
        "prefix length 129 is not between 1 and 128",
    ),
    (
        "netmask-not-contiguous",
        change(current_layout, set_in(v6_subnet, address="2a01:4f8:c0c:7bc5::1", netmask="ffff:ff0f::")),
        "subnet.netmask: netmask 'ffff:ff0f::' is not contiguous",
    ),
    ("hostname-with-underscore", change(current_layout, set_in(top, hostname="web_1")), "is not a valid host name"),
    ("hostname-missing", change(current_layout, drop_in(top, "hostname")), "'hostname': missing or empty"),
    (
        "nameserver-name",
        change(current_layout, set_in(v6_subnet, dns_nameservers=["dns.example"])),
        "dns_nameservers[0]: 'dns.example' is not an IPv4 address",
    ),
    (
        "nameservers-not-a-list",
        change(current_layout, set_in(v6_subnet, dns_nameservers="2a01:4ff:ff00::add:1")),
        "dns_nameservers: must be a list of addresses",
    ),
    (
        "public-ipv4-out-of-range",
        change(current_layout, set_in(top, **{"public-ipv4": "159.69.206.256"})),
        "'public-ipv4'",
    ),
]


def camel(data: dict[str, Any]) -> dict[str, Any]:
    """The program's instance data in the Nix functions' naming."""
    ipv6 = data["ipv6"]
    return {
        "hostname": data["hostname"],
        "hostName": data["host_name"],
        "domain": data["domain"],
        "macAddress": data["mac_address"],
        "instanceId": data["instance_id"],
        "region": data["region"],
        "publicIPv4": data["public_ipv4"],
        "ipv4Dhcp": data["ipv4_dhcp"],
        "ipv6": None
        if ipv6 is None
        else {
            "address": ipv6["address"],
            "prefixLength": ipv6["prefix_length"],
            "gateway": ipv6["gateway"],
            "nameservers": ipv6["nameservers"],
        },
    }


def subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(key in actual and subset(value, actual[key]) for key, value in expected.items())
    return bool(expected == actual)


@pytest.mark.parametrize(("meta", "expected"), [(m, e) for _, m, e in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_both_normalize_alike(tmp_path: Path, meta: Meta, expected: dict[str, Any]) -> None:
    python = camel(instance_data(meta))
    assert subset(expected, python), python
    raw = nix_facts(tmp_path, meta, "raw")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == python
    # The program's instance-data.json gives the Nix functions the same facts again.
    reduced = nix_facts(tmp_path, instance_data(meta), "reduced")
    assert reduced.returncode == 0, reduced.stderr
    assert json.loads(reduced.stdout) == python


@pytest.mark.parametrize(("meta", "phrase"), [(m, p) for _, m, p in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_both_refuse_alike(tmp_path: Path, meta: Meta, phrase: str) -> None:
    with pytest.raises(MetadataUnusable) as caught:
        instance_data(meta)
    assert phrase in str(caught.value)
    result = nix_facts(tmp_path, meta, "bad")
    assert result.returncode != 0
    assert phrase in result.stderr, result.stderr


def test_networkd_file_from_old_persisted_data_is_normalized() -> None:
    """Instance data persisted before normalization (zone, upper case) is rendered normalized on the next
    boot by `nix-dabei network`, so a host updated in place gets its IPv6 default route back."""
    old = {
        "hostname": "web-2",
        "mac_address": "96:00:00:2B:1C:9E",
        "ipv4_dhcp": True,
        "ipv6": {
            "address": "2a01:4f9:c010:8a3c::1",
            "prefix_length": 64,
            "gateway": "fe80::1%enp1s0",
            "nameservers": ["2a01:4ff:ff00::add:1"],
        },
    }
    text = render_networkd(old)
    assert "PermanentMACAddress=96:00:00:2b:1c:9e\n" in text
    assert "Gateway=fe80::1\n" in text and "%" not in text
    bad = json.loads(json.dumps(old))
    bad["ipv6"]["gateway"] = "fe80::1::1"
    with pytest.raises(MetadataUnusable, match=r"instance data ipv6\.gateway"):
        render_networkd(bad)
