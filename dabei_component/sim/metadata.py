"""Per-server metadata service: `/_metadata/{server_id}/hetzner/v1/metadata` and its sub-paths.

Answers what `169.254.169.254/hetzner/v1/metadata` answers on a real server (YAML, the shape of Hetzner's),
filled from the server's current state. No authentication, like the real one.
"""

from __future__ import annotations

from typing import Any

import yaml
from aiohttp import web

from .project import PROJECT
from .state import Server

routes = web.RouteTableDef()

DNS_SERVERS_V6 = ["2a01:4ff:ff00::add:2", "2a01:4ff:ff00::add:1"]


def vendor_data(server: Server) -> str:
    boundary = "===============" + str(server.id).rjust(19, "0") + "=="
    return (
        f'Content-Type: multipart/mixed; boundary="{boundary}"\nMIME-Version: 1.0\n\n'
        f'--{boundary}\nContent-Type: text/cloud-config; charset="us-ascii"\nMIME-Version: 1.0\n'
        "Content-Transfer-Encoding: 7bit\n"
        'Content-Disposition: attachment; filename="cloud-config"\n\n'
        f"#cloud-config\ndisable_root: false\nfqdn: {server.name}\nmanage_etc_hosts: true\n"
        "system_info:\n  default_user:\n    lock_passwd: true\n    name: root\n    shell: /bin/bash\n\n"
        f"--{boundary}--\n"
    )


def network_config(server: Server) -> dict[str, Any]:
    """The public interface's subnets: IPv4 by DHCP and static IPv6, each only when it is on; no public
    network at all gives an empty `config` (as Hetzner answers then)."""
    subnets: list[dict[str, Any]] = []
    if server.ipv4 is not None:
        subnets.append({"ipv4": True, "type": "dhcp"})
    if server.ipv6_address is not None:
        subnets.append(
            {
                "address": f"{server.ipv6_address}/64",
                "dns_nameservers": DNS_SERVERS_V6,
                "gateway": "fe80::1",
                "ipv6": True,
                "type": "static",
            }
        )
    entry = {"mac_address": server.mac, "name": "eth0", "subnets": subnets, "type": "physical"}
    return {"config": [entry] if subnets else [], "version": 1}


def metadata(server: Server, public_keys: list[str]) -> dict[str, Any]:
    return {
        "availability-zone": server.location["dc"],
        "hostname": server.name,
        "instance-id": server.id,
        "local-ipv4": server.private_net[0]["ip"] if server.private_net else "",
        "network-config": network_config(server),
        "public-ipv4": server.ipv4 or "",
        "public-keys": public_keys,
        "region": server.location["network_zone"],
        "vendor_data": vendor_data(server),
    }


def _yaml(value: object) -> web.Response:
    return web.Response(text=yaml.safe_dump(value, default_flow_style=False), content_type="text/yaml")


def _text(value: str) -> web.Response:
    return web.Response(text=value, content_type="text/plain")


def _server(request: web.Request) -> tuple[Server, list[str]]:
    project = request.app[PROJECT]
    try:
        server_id = int(request.match_info["server_id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such server\n") from None
    server = project.servers.get(server_id)
    if server is None:
        raise web.HTTPNotFound(text="no such server\n")
    outage = project.faults.take_metadata_outage(server_id)
    if outage is not None:
        unavailable = web.HTTPServiceUnavailable(text="metadata service unavailable (injected fault)\n")
        unavailable.set_status(outage)
        raise unavailable
    keys = [project.ssh_keys[i].public_key for i in server.ssh_key_ids if i in project.ssh_keys]
    return server, keys


BASE = "/_metadata/{server_id}/hetzner/v1"


@routes.get(BASE + "/metadata")
async def get_metadata(request: web.Request) -> web.Response:
    server, keys = _server(request)
    return _yaml(metadata(server, keys))


@routes.get(BASE + "/metadata/{item}")
async def get_metadata_item(request: web.Request) -> web.Response:
    server, keys = _server(request)
    item = request.match_info["item"]
    if item in ("hostname", "instance-id", "public-ipv4", "availability-zone", "region", "local-ipv4"):
        return _text(str(metadata(server, keys)[item]))
    if item == "network-config":
        return _yaml(network_config(server))
    if item == "public-keys":
        return _yaml(keys)
    if item == "userdata":
        return _text(server.user_data or "")
    if item == "vendor_data":
        return _text(vendor_data(server))
    raise web.HTTPNotFound(text=f"no metadata item {item!r}\n")


@routes.get(BASE + "/userdata")
async def get_userdata(request: web.Request) -> web.Response:
    server, _ = _server(request)
    return _text(server.user_data or "")
