"""pulumi-hcloud server settings a host passes through, with pulumi-hcloud's own names and types
(`pulumi_hcloud.ServerArgs`; stack config uses the schema's camelCase names), and those the component owns.

Values may be Pulumi outputs (a `hcloud.Network`'s ID, say): those are checked by pulumi-hcloud when known;
plain values are checked here, at preview, naming the property.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_hcloud as hcloud

from .validation import Problem

# Passed to `hcloud.Server` as given: Python name -> stack config name (pulumi-hcloud's schema).
PASS_THROUGH = {
    "networks": "networks",
    "placement_group_id": "placementGroupId",
    "public_nets": "publicNets",
    "backups": "backups",
    "delete_protection": "deleteProtection",
    "rebuild_protection": "rebuildProtection",
    "keep_disk": "keepDisk",
    "shutdown_before_deletion": "shutdownBeforeDeletion",
    "ignore_remote_firewall_ids": "ignoreRemoteFirewallIds",
}
BOOLEANS = (
    "backups",
    "delete_protection",
    "rebuild_protection",
    "keep_disk",
    "shutdown_before_deletion",
    "ignore_remote_firewall_ids",
)
# `hcloud.Server` settings the component sets itself, and why a host cannot set them.
OWNED = {
    "image": "the component writes the NixOS image to the disk (set nix-dabei:image); the server's "
    "creation image is only a placeholder",
    "user_data": "the installed system is configured by the seed and the flake, not by cloud-init",
    "rescue": "the component boots the rescue system itself to write the disk",
    "iso": "a mounted ISO would boot instead of the installed disk",
    "allow_deprecated_images": "the creation image is the component's placeholder",
    "datacenter": "use location (pulumi-hcloud deprecates datacenter)",
}
OWNED_CONFIG = {"image": "image", "user_data": "userData", "rescue": "rescue", "iso": "iso",
                "allow_deprecated_images": "allowDeprecatedImages", "datacenter": "datacenter"}  # fmt: skip
NETWORK_FIELDS = {"network_id": "networkId", "subnet_id": "subnetId", "ip": "ip", "alias_ips": "aliasIps"}
PUBLIC_NET_FIELDS = {"ipv4_enabled": "ipv4Enabled", "ipv6_enabled": "ipv6Enabled", "ipv4": "ipv4", "ipv6": "ipv6"}


def _plain(value: Any) -> bool:
    return not isinstance(value, pulumi.Output)


def field_of(item: Any, name: str) -> Any:
    """A field of a `ServerNetworkArgs`/`ServerPublicNetArgs` or of the equivalent plain dict."""
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def _positive_int(prop: str, value: Any, what: str) -> list[Problem]:
    if value is None or not _plain(value):
        return []
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [(prop, f"expected a {what} ID (a positive integer), got {value!r}")]
    return []


def _network(prop: str, item: Any) -> list[Problem]:
    if not isinstance(item, Mapping | hcloud.ServerNetworkArgs):
        return [(prop, f"expected {{networkId or subnetId, ip, aliasIps}}, got {type(item).__name__}")]
    problems: list[Problem] = []
    if isinstance(item, Mapping):
        known = set(NETWORK_FIELDS) | set(NETWORK_FIELDS.values())
        problems += [(f"{prop}.{k}", "unknown key") for k in sorted(set(item) - known)]
    if field_of(item, "network_id") is None and field_of(item, "subnet_id") is None:
        problems.append((prop, "needs network_id (a network's ID) or subnet_id"))
    problems += _positive_int(f"{prop}.network_id", field_of(item, "network_id"), "network")
    subnet = field_of(item, "subnet_id")
    if subnet is not None and _plain(subnet) and not isinstance(subnet, str):
        problems.append((f"{prop}.subnet_id", f"expected a subnet ID such as '123-10.0.1.0/24', got {subnet!r}"))
    addresses = [("ip", field_of(item, "ip"))]
    aliases = field_of(item, "alias_ips")
    if aliases is not None and _plain(aliases):
        if not isinstance(aliases, list):
            problems.append((f"{prop}.alias_ips", f"expected a list of IPv4 addresses, got {aliases!r}"))
        else:
            addresses += [(f"alias_ips[{i}]", a) for i, a in enumerate(aliases)]
    for where, value in addresses:
        if value is None or not _plain(value):
            continue
        try:
            ipaddress.IPv4Address(value)
        except (ValueError, TypeError):
            problems.append((f"{prop}.{where}", f"expected a private IPv4 address like 10.0.1.5, got {value!r}"))
    return problems


def _public_nets(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, list):
        return [(prop, f"expected a list with one {{ipv4Enabled, ipv6Enabled, ipv4, ipv6}}, got {value!r}")]
    if len(value) > 1:
        return [(prop, f"expected at most one entry (pulumi-hcloud's public_net block), got {len(value)}")]
    problems: list[Problem] = []
    for i, item in enumerate(value):
        where = f"{prop}[{i}]"
        if not isinstance(item, Mapping | hcloud.ServerPublicNetArgs):
            problems.append((where, f"expected {{ipv4Enabled, ipv6Enabled, ipv4, ipv6}}, got {type(item).__name__}"))
            continue
        if isinstance(item, Mapping):
            known = set(PUBLIC_NET_FIELDS) | set(PUBLIC_NET_FIELDS.values())
            problems += [(f"{where}.{k}", "unknown key") for k in sorted(set(item) - known)]
        on = {}
        for family in ("ipv4", "ipv6"):
            enabled = field_of(item, f"{family}_enabled")
            if enabled is not None and _plain(enabled) and not isinstance(enabled, bool):
                problems.append((f"{where}.{family}_enabled", f"expected true or false, got {enabled!r}"))
            problems += _positive_int(f"{where}.{family}", field_of(item, family), f"{family} primary IP")
            on[family] = enabled
            if enabled is False and field_of(item, family) is not None:
                problems.append((f"{where}.{family}", f"a primary IP for {family}, but {family}_enabled is false"))
        if on["ipv4"] is False and on["ipv6"] is False:
            problems.append(
                (
                    where,
                    "public IPv4 and IPv6 are both off: the component installs the server over SSH on "
                    "its public IPv4 or IPv6 address, so keep one on",
                )
            )
    return problems


def validate(prefix: str, host: Any) -> list[Problem]:
    """Problems of a host's pass-through settings (`prefix` is like `hosts[0]`), and owned ones set."""
    problems: list[Problem] = []
    for owned, reason in OWNED.items():
        if getattr(host, owned, None) is not None:
            problems.append((f"{prefix}.{owned}", f"not settable on a nix-dabei host: {reason}"))
    for name in BOOLEANS:
        value = getattr(host, name)
        if value is not None and _plain(value) and not isinstance(value, bool):
            problems.append((f"{prefix}.{name}", f"expected true or false, got {value!r}"))
    delete, rebuild = host.delete_protection, host.rebuild_protection
    # pulumi-hcloud's ServerArgs: "Needs to be the same as rebuild_protection" (one API call sets both; one
    # left out is false), so true on one side alone is refused too.
    if _plain(delete) and _plain(rebuild) and True in (delete, rebuild) and delete is not rebuild:
        if delete is None or rebuild is None:
            other = "rebuild_protection" if rebuild is None else "delete_protection"
            reason = "must be set to true as well: pulumi-hcloud sets delete and rebuild protection together"
            problems.append((f"{prefix}.{other}", reason))
        elif isinstance(delete, bool) and isinstance(rebuild, bool):
            reason = "must equal delete_protection (pulumi-hcloud sets both together)"
            problems.append((f"{prefix}.rebuild_protection", reason))
    problems += _positive_int(f"{prefix}.placement_group_id", host.placement_group_id, "placement group")
    networks = host.networks
    if networks is not None and _plain(networks):
        if not isinstance(networks, list):
            problems.append((f"{prefix}.networks", f"expected a list of network attachments, got {networks!r}"))
        else:
            for i, item in enumerate(networks):
                problems += _network(f"{prefix}.networks[{i}]", item)
    if host.public_nets is not None and _plain(host.public_nets):
        problems += _public_nets(f"{prefix}.public_nets", host.public_nets)
    return problems


def server_kwargs(host: Any) -> dict[str, Any]:
    """The pass-through settings a host gives, as `hcloud.Server` keyword arguments."""
    return {name: getattr(host, name) for name in PASS_THROUGH if getattr(host, name) is not None}


def set_on(host: Any) -> list[str]:
    """Names of the server settings a host gives (pass-through and owned), for refusing them where the
    component does not create the server."""
    return [
        n
        for n in (*PASS_THROUGH, "server_type", "location", "labels", "firewall_ids")
        if getattr(host, n, None) not in (None, [], {})
    ]
