"""systemd-networkd configuration for the public interface, matched by the permanent MAC address from
the metadata.

The file goes to ``/run/systemd/network`` (networkd's runtime directory: ``/etc/systemd/network`` is
read-only on NixOS). Its name sorts before the image's catch-all virtio DHCP network, so networkd applies
it to the uplink, whatever the kernel named that interface. ``PermanentMACAddress=`` (systemd.network(5))
matches the NIC only, not bridges or VLANs that inherit its MAC.
"""

from __future__ import annotations

import subprocess
from typing import Any

from .config import NETWORKD_FILE, Config
from .metadata import normalize_ip, normalize_ipv6, normalize_mac, prefix_length
from .status import write_atomic


class NetworkError(Exception):
    """The network configuration could not be written or loaded."""


def render_networkd(data: dict[str, Any]) -> str:
    """The .network file for the instance data. Addresses are normalized again, so instance data
    persisted by an older version (a gateway with a zone, a MAC in upper case) is rendered right too;
    raises MetadataUnusable naming the bad value."""
    where = "instance data"
    lines = [
        "# Written by nix-dabei from the Hetzner instance metadata.",
        "[Match]",
        f"PermanentMACAddress={normalize_mac(data['mac_address'], f'{where} mac_address')}",
        "",
        "[Network]",
        f"DHCP={'ipv4' if data['ipv4_dhcp'] else 'no'}",
    ]
    ipv6 = data.get("ipv6")
    if ipv6:
        address = normalize_ipv6(ipv6["address"], f"{where} ipv6.address")
        lines.append(f"Address={address}/{prefix_length(ipv6['prefix_length'], f'{where} ipv6.prefix_length')}")
        lines.extend(f"DNS={normalize_ip(server, f'{where} ipv6.nameservers')}" for server in ipv6["nameservers"])
        # Hetzner routes IPv6 through a link-local gateway; router advertisements are not needed.
        lines.append("IPv6AcceptRA=no")
        gateway = normalize_ipv6(ipv6["gateway"], f"{where} ipv6.gateway")
        lines += ["", "[Route]", f"Gateway={gateway}", "GatewayOnLink=yes"]
    return "\n".join(lines) + "\n"


def apply_network(config: Config, data: dict[str, Any], reload: bool = True) -> str:
    """Write the networkd file and (with ``reload``) ask a running networkd to apply it at once."""
    path = config.path(NETWORKD_FILE)
    try:
        write_atomic(path, render_networkd(data).encode())
    except OSError as exc:
        raise NetworkError(f"cannot write {path}: {exc.strerror or exc}") from None
    if reload and config.network_reload_command is not None:
        try:
            result = subprocess.run(
                list(config.network_reload_command),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetworkError(f"network reload {list(config.network_reload_command)} failed: {exc}") from None
        if result.returncode != 0:
            raise NetworkError(
                f"network reload {list(config.network_reload_command)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
    return str(path)
