"""systemd-networkd configuration for the public interface, matched by the MAC address from the metadata.

The file goes to ``/run/systemd/network`` (networkd's runtime directory: ``/etc/systemd/network`` is
read-only on NixOS). Its name sorts before the image's catch-all ``Type=ether`` DHCP network, so networkd
applies it to the uplink, whatever the kernel named that interface.
"""

from __future__ import annotations

import subprocess
from typing import Any

from .config import NETWORKD_FILE, Config
from .status import write_atomic


class NetworkError(Exception):
    """The network configuration could not be written or loaded."""


def render_networkd(data: dict[str, Any]) -> str:
    lines = [
        "# Written by nix-dabei from the Hetzner instance metadata.",
        "[Match]",
        f"MACAddress={data['mac_address']}",
        "",
        "[Network]",
        f"DHCP={'ipv4' if data['ipv4_dhcp'] else 'no'}",
    ]
    ipv6 = data.get("ipv6")
    if ipv6:
        lines.append(f"Address={ipv6['address']}/{ipv6['prefix_length']}")
        lines.extend(f"DNS={server}" for server in ipv6["nameservers"])
        # Hetzner routes IPv6 through a link-local gateway; router advertisements are not needed.
        lines.append("IPv6AcceptRA=no")
        lines += ["", "[Route]", f"Gateway={ipv6['gateway']}", "GatewayOnLink=yes"]
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
