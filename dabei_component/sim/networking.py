"""`/networks`, `/placement_groups`, `/primary_ips` (create, list by name, get, delete) and the server
actions that use them or change a server's settings: `attach_to_network`, `change_protection`,
`enable_backup`, `disable_backup`. Shapes follow the OpenAPI schemas of the same names."""

from __future__ import annotations

import ipaddress
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .errors import ApiError, invalid_input, not_found, uniqueness
from .project import PROJECT, Project
from .query import json_response, paginate, path_id, read_json, validate_labels
from .state import LOCATIONS, Server, datacenter_json, iso, location_json

routes = web.RouteTableDef()
_ids = itertools.count(1_100_001)


@dataclass
class Network:
    id: int
    name: str
    ip_range: str
    subnets: list[dict[str, Any]]
    labels: dict[str, str]
    created: float = field(default_factory=time.time)

    def to_json(self, project: Project) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "ip_range": self.ip_range,
            "subnets": self.subnets,
            "routes": [],
            "servers": sorted(
                s.id for s in project.servers.values() if any(n["network"] == self.id for n in s.private_net)
            ),
            "load_balancers": [],
            "protection": {"delete": False},
            "labels": self.labels,
            "created": iso(self.created),
            "expose_routes_to_vswitch": False,
        }


@dataclass
class PlacementGroup:
    id: int
    name: str
    labels: dict[str, str]
    type: str = "spread"
    created: float = field(default_factory=time.time)

    def to_json(self, project: Project) -> dict[str, Any]:
        members = sorted(s.id for s in project.servers.values() if s.placement_group_id == self.id)
        return {
            "id": self.id,
            "name": self.name,
            "labels": self.labels,
            "type": self.type,
            "created": iso(self.created),
            "servers": members,
        }


@dataclass
class PrimaryIp:
    id: int
    name: str
    type: str  # ipv4 | ipv6
    ip: str  # an address, or for ipv6 the /64 network
    location: dict[str, Any]
    labels: dict[str, str]
    auto_delete: bool = False
    assignee_id: int | None = None
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "ip": self.ip,
            "assignee_id": self.assignee_id,
            "assignee_type": "server",
            "auto_delete": self.auto_delete,
            "blocked": False,
            "created": iso(self.created),
            "datacenter": datacenter_json(self.location),
            "location": location_json(self.location),
            "dns_ptr": [],
            "labels": self.labels,
            "protection": {"delete": False},
        }


def _store(project: Project, kind: str) -> dict[int, Any]:
    store: dict[int, Any] = project.extra.setdefault(kind, {})
    return store


def networks(project: Project) -> dict[int, Network]:
    return _store(project, "networks")


def placement_groups(project: Project) -> dict[int, PlacementGroup]:
    return _store(project, "placement_groups")


def primary_ips(project: Project) -> dict[int, PrimaryIp]:
    return _store(project, "primary_ips")


def _name(body: dict[str, Any], items: dict[int, Any], kind: str) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise invalid_input({"name": ["is required"]})
    if any(item.name == name for item in items.values()):
        raise uniqueness("name", f"{kind} name {name!r} is already used")
    return name


def _listing(request: web.Request, items: dict[int, Any], key: str, render: Any) -> web.Response:
    name = request.query.get("name")
    found = [item for _, item in sorted(items.items()) if name is None or item.name == name]
    page, meta = paginate(request, found)
    return json_response({key: [render(item) for item in page], "meta": meta})


def _get(items: dict[int, Any], request: web.Request, kind: str) -> Any:
    ident = path_id(request)
    if ident not in items:
        raise not_found(kind, ident)
    return items[ident]


# --- networks --------------------------------------------------------------------------------------


def _subnet(value: Any, network_range: ipaddress.IPv4Network) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in ("cloud", "server"):
        raise invalid_input({"subnets": ["each subnet needs type cloud or server"]})
    try:
        ip_range = ipaddress.IPv4Network(value.get("ip_range", ""))
    except ValueError:
        raise invalid_input({"subnets": [f"{value.get('ip_range')!r} is not an IPv4 range"]}) from None
    if not ip_range.subnet_of(network_range):
        raise invalid_input({"subnets": [f"{ip_range} is not inside {network_range}"]})
    return {
        "type": value["type"],
        "ip_range": str(ip_range),
        "network_zone": value.get("network_zone") or "eu-central",
        "gateway": str(network_range[1]),
        "vswitch_id": None,
    }


@routes.post("/v1/networks")
async def create_network(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    body = await read_json(request)
    name = _name(body, networks(project), "network")
    try:
        ip_range = ipaddress.IPv4Network(body.get("ip_range", ""))
    except ValueError:
        raise invalid_input({"ip_range": ["must be an IPv4 network such as 10.0.0.0/16"]}) from None
    subnets = [_subnet(s, ip_range) for s in body.get("subnets") or []]
    net = Network(next(_ids), name, str(ip_range), subnets, validate_labels(body.get("labels", {})))
    networks(project)[net.id] = net
    return json_response({"network": net.to_json(project)}, status=201)


@routes.get("/v1/networks")
async def list_networks(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    return _listing(request, networks(project), "networks", lambda n: n.to_json(project))


@routes.get("/v1/networks/{id}")
async def get_network(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    return json_response({"network": _get(networks(project), request, "network").to_json(project)})


@routes.delete("/v1/networks/{id}")
async def delete_network(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    net = _get(networks(project), request, "network")
    if net.to_json(project)["servers"]:
        raise ApiError("conflict", f"network {net.id} still has servers attached", status=409)
    del networks(project)[net.id]
    return web.Response(status=204)


# --- placement groups -------------------------------------------------------------------------------


@routes.post("/v1/placement_groups")
async def create_placement_group(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    body = await read_json(request)
    name = _name(body, placement_groups(project), "placement group")
    if body.get("type") != "spread":
        raise invalid_input({"type": ["must be spread"]})
    group = PlacementGroup(next(_ids), name, validate_labels(body.get("labels", {})))
    placement_groups(project)[group.id] = group
    return json_response({"placement_group": group.to_json(project), "action": None}, status=201)


@routes.get("/v1/placement_groups")
async def list_placement_groups(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    return _listing(request, placement_groups(project), "placement_groups", lambda g: g.to_json(project))


@routes.get("/v1/placement_groups/{id}")
async def get_placement_group(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    group = _get(placement_groups(project), request, "placement group")
    return json_response({"placement_group": group.to_json(project)})


@routes.delete("/v1/placement_groups/{id}")
async def delete_placement_group(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    group = _get(placement_groups(project), request, "placement group")
    del placement_groups(project)[group.id]
    return web.Response(status=204)


# --- primary IPs ------------------------------------------------------------------------------------


@routes.post("/v1/primary_ips")
async def create_primary_ip(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    body = await read_json(request)
    name = _name(body, primary_ips(project), "primary IP")
    kind = body.get("type")
    if kind not in ("ipv4", "ipv6"):
        raise invalid_input({"type": ["must be ipv4 or ipv6"]})
    wanted = body.get("location") or "fsn1"
    location = next((loc for loc in LOCATIONS if loc["name"] == wanted), None)
    if location is None:
        raise invalid_input({"location": [f"unknown location {wanted!r}"]})
    if body.get("assignee_id") is not None:
        raise invalid_input({"assignee_id": ["the simulator assigns primary IPs only when a server is created"]})
    ipv4, ipv6_net, _ = project.addresses.allocate()
    if kind == "ipv6":
        project.addresses.release(ipv4)
    ip = PrimaryIp(
        next(_ids), name, kind, ipv4 if kind == "ipv4" else ipv6_net, location,
        validate_labels(body.get("labels", {})), auto_delete=bool(body.get("auto_delete", False)),
    )  # fmt: skip
    primary_ips(project)[ip.id] = ip
    return json_response({"primary_ip": ip.to_json()}, status=201)


@routes.get("/v1/primary_ips")
async def list_primary_ips(request: web.Request) -> web.Response:
    return _listing(request, primary_ips(request.app[PROJECT]), "primary_ips", lambda p: p.to_json())


@routes.get("/v1/primary_ips/{id}")
async def get_primary_ip(request: web.Request) -> web.Response:
    return json_response({"primary_ip": _get(primary_ips(request.app[PROJECT]), request, "primary IP").to_json()})


@routes.delete("/v1/primary_ips/{id}")
async def delete_primary_ip(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    ip = _get(primary_ips(project), request, "primary IP")
    if ip.assignee_id is not None:
        raise ApiError("must_be_unassigned", f"primary IP {ip.id} is assigned to server {ip.assignee_id}", status=422)
    del primary_ips(project)[ip.id]
    if ip.type == "ipv4":
        project.addresses.release(ip.ip)
    return web.Response(status=204)


# --- used by server create -------------------------------------------------------------------------


def public_net(
    project: Project, body: Any, location: dict[str, Any]
) -> tuple[PrimaryIp | None, PrimaryIp | None, bool, bool]:
    """`(ipv4 primary IP, ipv6 primary IP, enable_ipv4, enable_ipv6)` of a create request's `public_net`."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise invalid_input({"public_net": ["must be an object"]})
    chosen: dict[str, PrimaryIp | None] = {}
    for kind in ("ipv4", "ipv6"):
        ident = body.get(kind)
        if ident is None:
            chosen[kind] = None
            continue
        ip = primary_ips(project).get(ident) if isinstance(ident, int) else None
        if ip is None or ip.type != kind:
            raise invalid_input({f"public_net.{kind}": [f"unknown {kind} primary IP {ident!r}"]})
        if ip.assignee_id is not None:
            raise ApiError("primary_ip_assigned", f"primary IP {ip.id} is already assigned", status=422)
        if ip.location["name"] != location["name"]:
            raise invalid_input({f"public_net.{kind}": [f"primary IP {ip.id} is in {ip.location['name']}"]})
        chosen[kind] = ip
    enable_ipv4 = body.get("enable_ipv4", True) is not False or chosen["ipv4"] is not None
    enable_ipv6 = body.get("enable_ipv6", True) is not False or chosen["ipv6"] is not None
    return chosen["ipv4"], chosen["ipv6"], enable_ipv4, enable_ipv6


def placement_group(project: Project, ident: Any) -> int | None:
    if ident is None:
        return None
    if not isinstance(ident, int) or ident not in placement_groups(project):
        raise invalid_input({"placement_group": [f"unknown placement group {ident!r}"]})
    return ident


def attach(project: Project, server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """The `private_net` entry for attaching `server` as `body` asks (`network`, `ip`, `alias_ips`)."""
    ident = body.get("network")
    net = networks(project).get(ident) if isinstance(ident, int) else None
    if net is None:
        raise invalid_input({"network": [f"unknown network {body.get('network')!r}"]})
    if any(n["network"] == net.id for n in server.private_net):
        raise ApiError("server_already_attached", f"server {server.id} is already attached to {net.id}", status=422)
    ranges = [ipaddress.IPv4Network(s["ip_range"]) for s in net.subnets if s["type"] == "cloud"]
    if not ranges:
        raise invalid_input({"network": [f"network {net.id} has no cloud subnet"]})
    taken = {n["ip"] for s in project.servers.values() for n in s.private_net if n["network"] == net.id}
    ip = body.get("ip")
    if ip is not None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise invalid_input({"ip": [f"{ip!r} is not an IPv4 address"]}) from None
        if not any(addr in r for r in ranges) or str(addr) in taken:
            raise ApiError("ip_not_available", f"IP {ip} is not available in network {net.id}", status=422)
    else:
        ip = next(str(a) for r in ranges for a in list(r.hosts())[1:] if str(a) not in taken)
    alias = body.get("alias_ips") or []
    if not isinstance(alias, list) or not all(isinstance(a, str) for a in alias):
        raise invalid_input({"alias_ips": ["must be a list of IPv4 addresses"]})
    mac = f"86:00:00:{net.id % 256:02x}:{server.id // 256 % 256:02x}:{server.id % 256:02x}"
    return {"network": net.id, "ip": str(ip), "alias_ips": list(alias), "mac_address": mac}


# --- server actions ---------------------------------------------------------------------------------


def _action_response(project: Project, server: Server, command: str, work: Any) -> web.Response:
    action = project.server_action(server, command, 0.05)
    project.run_on_server(server, [(action, work)])
    return json_response({"action": action.to_json()}, status=201)


@routes.post("/v1/servers/{id}/actions/attach_to_network")
async def attach_to_network(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    server = project.server(path_id(request))
    entry = attach(project, server, await read_json(request))

    async def work() -> None:
        server.private_net.append(entry)

    return _action_response(project, server, "attach_to_network", work)


@routes.post("/v1/servers/{id}/actions/change_protection")
async def change_protection(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    server = project.server(path_id(request))
    body = await read_json(request)
    changes: dict[str, bool] = {k: body[k] for k in ("delete", "rebuild") if k in body}
    if not all(isinstance(v, bool) for v in changes.values()):
        raise invalid_input({k: ["must be a boolean"] for k in changes})
    # The API's ServerProtection: "currently delete and rebuild attribute needs to have the same value".
    after = {**server.protection, **changes}
    if after.get("delete", False) != after.get("rebuild", False):
        raise invalid_input({k: ["delete and rebuild protection need to have the same value"] for k in changes})

    async def work() -> None:
        server.protection.update(changes)

    return _action_response(project, server, "change_protection", work)


@routes.post("/v1/servers/{id}/actions/enable_backup")
async def enable_backup(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    server = project.server(path_id(request))

    async def work() -> None:
        server.backup_window = "22-02"

    return _action_response(project, server, "enable_backup", work)


@routes.post("/v1/servers/{id}/actions/disable_backup")
async def disable_backup(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    server = project.server(path_id(request))

    async def work() -> None:
        server.backup_window = None

    return _action_response(project, server, "disable_backup", work)
