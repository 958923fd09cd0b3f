"""`/servers` and the server actions; booting and halting drive the server's machine."""

from __future__ import annotations

import re
import secrets
import string
import time
from typing import Any

from aiohttp import web

from . import networking
from .actions import list_actions_response
from .errors import ApiError, invalid_input, locked, not_found, uniqueness
from .project import PROJECT, Project, Work
from .query import (
    compile_label_selector,
    enum_list_param,
    json_response,
    paginate,
    path_id,
    read_json,
    sort_items,
    validate_labels,
)
from .state import LOCATIONS, SERVER_TYPES, Action, Image, Server, SshKey, offered

routes = web.RouteTableDef()

SERVER_STATUSES = (
    "running", "initializing", "starting", "stopping", "off", "deleting", "migrating", "rebuilding", "unknown",
)  # fmt: skip
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
USER_DATA_LIMIT = 32 * 1024
UNSUPPORTED_CREATE_FIELDS = ("volumes", "firewalls")


def root_password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def validate_name(value: object) -> str:
    """Server names must be valid hostnames as per RFC 1123."""
    if not isinstance(value, str) or not value:
        raise invalid_input({"name": ["is required and must be a string"]})
    if len(value) > 253 or not all(_HOST_LABEL.match(label) for label in value.split(".")):
        raise invalid_input({"name": [f"{value!r} is not a valid hostname (RFC 1123)"]})
    return value


def _by_id_or_name(value: object, field: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    for item in items:
        if isinstance(value, str) and (item["name"] == value or value == str(item["id"])):
            return item
        if isinstance(value, int) and not isinstance(value, bool) and item["id"] == value:
            return item
    raise invalid_input({field: [f"unknown {field} {value!r}; known: {[i['name'] for i in items]}"]})


def _resolve_image(project: Project, value: object, architecture: str) -> Image:
    candidates = list(project.images.values())
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        image = project.images.get(int(value))
        if image is None:
            raise invalid_input({"image": [f"unknown image ID {value}"]})
    elif isinstance(value, str):
        named = [i for i in candidates if i.name == value and i.type == "system"]
        image = next((i for i in named if i.architecture == architecture), named[0] if named else None)
        if image is None:
            names = sorted({i.name for i in candidates if i.name})
            raise invalid_input({"image": [f"unknown image {value!r}; known: {names}"]})
    else:
        raise invalid_input({"image": ["must be an image ID or name"]})
    if image.status != "available":
        raise invalid_input({"image": [f"image {image.id} is not available (status {image.status})"]})
    if image.architecture != architecture:
        raise invalid_input({"image": [f"image {image.id} is for {image.architecture}, not {architecture}"]})
    return image


def resolve_ssh_keys(project: Project, values: object, field: str) -> list[SshKey]:
    """SSH keys by ID or name; unknown ones are named in the error."""
    if not isinstance(values, list):
        raise invalid_input({field: ["must be a list of SSH key IDs or names"]})
    keys, unknown = [], []
    for value in values:
        key = None
        if isinstance(value, int) and not isinstance(value, bool):
            key = project.ssh_keys.get(value)
        elif isinstance(value, str):
            key = next((k for k in project.ssh_keys.values() if k.name == value or str(k.id) == value), None)
        if key is None:
            unknown.append(value)
        else:
            keys.append(key)
    if unknown:
        raise invalid_input({field: [f"unknown SSH key(s): {unknown}"]})
    return keys


def _server_for_request(request: web.Request) -> tuple[Project, Server]:
    project = request.app[PROJECT]
    return project, project.server(path_id(request))


@routes.get("/v1/servers")
async def list_servers(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    name = request.query.get("name")
    statuses = enum_list_param(request, "status", SERVER_STATUSES)
    selector = compile_label_selector(request.query.get("label_selector"))
    items = [
        server
        for server in project.servers.values()
        if (name is None or server.name == name)
        and (not statuses or server.status in statuses)
        and selector(server.labels)
    ]
    items = sort_items(
        request,
        items,
        {"id": lambda s: s.id, "name": lambda s: s.name, "created": lambda s: s.created},
    )
    page, meta = paginate(request, items)
    return json_response({"servers": [server.to_json() for server in page], "meta": meta})


@routes.post("/v1/servers")
async def create_server(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    body = await read_json(request)
    missing = [field for field in ("name", "server_type", "image") if field not in body]
    if missing:
        raise invalid_input({field: ["is required"] for field in missing})
    unsupported = [field for field in UNSUPPORTED_CREATE_FIELDS if body.get(field)]
    if unsupported:
        raise invalid_input({field: ["is not supported by the simulator"] for field in unsupported})
    name = validate_name(body["name"])
    server_type = _by_id_or_name(body["server_type"], "server_type", SERVER_TYPES)
    image = _resolve_image(project, body["image"], server_type["architecture"])
    if "location" in body:
        location = _by_id_or_name(body["location"], "location", LOCATIONS)
    elif "datacenter" in body:
        datacenters = [{**loc, "name": loc["dc"]} for loc in LOCATIONS]
        chosen = _by_id_or_name(body["datacenter"], "datacenter", datacenters)
        location = next(loc for loc in LOCATIONS if loc["id"] == chosen["id"])
    else:
        location = LOCATIONS[0]
    if not offered(server_type, location):
        # The real API's answer (code, message and empty details) to a CAX in ash, for one.
        raise ApiError("invalid_input", "unsupported location for server type", {})
    keys = resolve_ssh_keys(project, body.get("ssh_keys", []), "ssh_keys")
    labels = validate_labels(body.get("labels", {}))
    user_data = body.get("user_data")
    if user_data is not None and (not isinstance(user_data, str) or len(user_data) > USER_DATA_LIMIT):
        raise invalid_input({"user_data": [f"must be a string of at most {USER_DATA_LIMIT} bytes"]})
    start = body.get("start_after_create", True)
    if not isinstance(start, bool):
        raise invalid_input({"start_after_create": ["must be a boolean"]})
    if any(server.name == name for server in project.servers.values()):
        raise uniqueness("name", f"server name {name!r} is already used")
    primary4, primary6, enable_ipv4, enable_ipv6 = networking.public_net(project, body.get("public_net"), location)
    group_id = networking.placement_group(project, body.get("placement_group"))
    network_ids = body.get("networks") or []
    if not isinstance(network_ids, list) or not all(isinstance(n, int) for n in network_ids):
        raise invalid_input({"networks": ["must be a list of network IDs"]})

    ipv4, ipv6_net, mac = project.addresses.allocate()
    if primary4 is not None or not enable_ipv4:
        project.addresses.release(ipv4)
    server = Server(
        id=project.next_server_id(),
        name=name,
        server_type=server_type,
        location=location,
        image=image,
        ssh_key_ids=[key.id for key in keys],
        labels=labels,
        ipv4=primary4.ip if primary4 is not None else ipv4 if enable_ipv4 else None,
        ipv6_net=primary6.ip if primary6 is not None else ipv6_net if enable_ipv6 else None,
        mac=mac,
        user_data=user_data,
        ipv4_id=primary4.id if primary4 is not None else None,
        ipv6_id=primary6.id if primary6 is not None else None,
        placement_group_id=group_id,
    )
    if group_id is not None:
        server.placement_group_json = lambda: networking.placement_groups(project)[group_id].to_json(project)
    server.private_net = [networking.attach(project, server, {"network": n}) for n in network_ids]
    for primary in (primary4, primary6):
        if primary is not None:
            primary.assignee_id = server.id
    project.servers[server.id] = server
    create_action = project.server_action(server, "create_server", project.durations.create)

    async def create() -> None:
        project.create_machine(server)
        server.status = "off"

    steps: list[tuple[Action, Work]] = [(create_action, create)]
    if start:
        start_action = project.server_action(server, "start_server", project.durations.boot)
        steps.append((start_action, lambda: project.boot(server)))
    project.run_on_server(server, steps)
    return json_response(
        {
            "server": server.to_json(),
            "action": create_action.to_json(),
            "next_actions": [action.to_json() for action, _ in steps[1:]],
            "root_password": None if keys else root_password(),
        },
        status=201,
    )


@routes.get("/v1/servers/actions")
async def list_server_actions(request: web.Request) -> web.Response:
    actions = [a for a in request.app[PROJECT].actions.values() if any(r["type"] == "server" for r in a.resources)]
    return list_actions_response(request, actions)


@routes.get("/v1/servers/actions/{id}")
async def get_server_action(request: web.Request) -> web.Response:
    action_id = path_id(request)
    action = request.app[PROJECT].actions.get(action_id)
    if action is None or not any(r["type"] == "server" for r in action.resources):
        raise not_found("action", action_id)
    return json_response({"action": action.to_json()})


@routes.get("/v1/servers/{id}")
async def get_server(request: web.Request) -> web.Response:
    _, server = _server_for_request(request)
    return json_response({"server": server.to_json()})


@routes.put("/v1/servers/{id}")
async def update_server(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    body = await read_json(request)
    name = validate_name(body["name"]) if "name" in body else server.name
    labels = validate_labels(body["labels"]) if "labels" in body else server.labels
    if any(other.name == name and other.id != server.id for other in project.servers.values()):
        raise uniqueness("name", f"server name {name!r} is already used")
    server.name, server.labels = name, labels
    return json_response({"server": server.to_json()})


@routes.delete("/v1/servers/{id}")
async def delete_server(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    if server.protection.get("delete"):
        raise ApiError("protected", f"server {server.id} is delete protected", status=403)
    # Deleting is allowed while locked: the server disappears at once, its machine after running work.
    del project.servers[server.id]
    for primary in networking.primary_ips(project).values():
        if primary.assignee_id == server.id:
            primary.assignee_id = None
    server.status = "deleting"
    action = project.server_action(server, "delete_server", project.durations.delete)
    project.run_detached(action, lambda: project.destroy(server))
    return json_response({"action": action.to_json()})


@routes.get("/v1/servers/{id}/actions")
async def list_actions_for_server(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    actions = [a for a in project.actions.values() if {"id": server.id, "type": "server"} in a.resources]
    return list_actions_response(request, actions)


@routes.get("/v1/servers/{id}/actions/{action_id}")
async def get_action_for_server(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    action_id = path_id(request, "action_id")
    action = project.actions.get(action_id)
    if action is None or {"id": server.id, "type": "server"} not in action.resources:
        raise not_found("action", action_id)
    return json_response({"action": action.to_json()})


def _simple_action(command: str, duration_name: str, work_name: str) -> Any:
    """A server action without parameters whose work is one of `_WORK`."""

    async def handler(request: web.Request) -> web.Response:
        project, server = _server_for_request(request)
        action = project.server_action(server, command, getattr(project.durations, duration_name))
        work = _WORK[work_name](project, server)
        project.run_on_server(server, [(action, work)])
        return json_response({"action": action.to_json()}, status=201)

    handler.__name__ = command
    return handler


def _boot_work(project: Project, server: Server) -> Any:
    async def work() -> None:
        if server.status != "running":
            await project.boot(server)

    return work


def _restart_work(project: Project, server: Server) -> Any:
    async def work() -> None:
        await project.halt(server, graceful=False)
        await project.boot(server)

    return work


def _halt_work(graceful: bool) -> Any:
    def make(project: Project, server: Server) -> Any:
        return lambda: project.halt(server, graceful=graceful)

    return make


def _disable_rescue_work(project: Project, server: Server) -> Any:
    async def work() -> None:
        server.disable_rescue()

    return work


_WORK = {
    "boot": _boot_work,
    "restart": _restart_work,
    "poweroff": _halt_work(graceful=False),
    "shutdown": _halt_work(graceful=True),
    "disable_rescue": _disable_rescue_work,
}

for _command, _path, _duration, _work in [
    ("start_server", "poweron", "boot", "boot"),
    ("stop_server", "poweroff", "poweroff", "poweroff"),
    ("shutdown_server", "shutdown", "shutdown", "shutdown"),
    ("reboot_server", "reboot", "reboot", "restart"),
    ("reset_server", "reset", "reset", "restart"),
    ("disable_rescue", "disable_rescue", "rescue_disable", "disable_rescue"),
]:
    routes.post(f"/v1/servers/{{id}}/actions/{_path}")(_simple_action(_command, _duration, _work))


@routes.post("/v1/servers/{id}/actions/change_type")
async def change_type(request: web.Request) -> web.Response:
    """Hetzner's rule: the server must be off; the new type's disk must not be smaller; with `upgrade_disk`
    the disk grows (its content is kept), and the server is started again (the API documentation)."""
    project, server = _server_for_request(request)
    body = await read_json(request)
    if not isinstance(body.get("upgrade_disk"), bool):
        raise invalid_input({"upgrade_disk": ["is required and must be a boolean"]})
    new_type = _by_id_or_name(body.get("server_type"), "server_type", SERVER_TYPES)
    if server.status != "off":
        raise ApiError("server_not_stopped", "The action requires a stopped server")
    old_type = server.server_type
    if new_type["disk"] < old_type["disk"] or new_type["architecture"] != old_type["architecture"]:
        raise ApiError("invalid_server_type", f"server type {new_type['name']!r} does not fit this server")
    action = project.server_action(server, "change_server_type", project.durations.change_type)

    async def work() -> None:
        server.server_type = new_type
        if body["upgrade_disk"]:
            await project.machines[server.id].resize_disk(int(new_type["disk"]) * 1024**3)
        await project.boot(server)

    project.run_on_server(server, [(action, work)])
    return json_response({"action": action.to_json()}, status=201)


@routes.post("/v1/servers/{id}/actions/enable_rescue")
async def enable_rescue(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    body = await read_json(request)
    rescue_type = body.get("type") or "linux64"
    if rescue_type != "linux64":
        raise invalid_input({"type": [f"unsupported rescue type {rescue_type!r}; supported: linux64"]})
    keys = resolve_ssh_keys(project, body.get("ssh_keys") or [], "ssh_keys")
    password = root_password()
    action = project.server_action(server, "enable_rescue", project.durations.rescue_enable)

    async def work() -> None:
        server.rescue_enabled = True
        server.rescue_keys = [key.public_key for key in keys]
        server.rescue_expires = time.time() + project.durations.rescue_expiry

    project.run_on_server(server, [(action, work)])
    return json_response({"action": action.to_json(), "root_password": password}, status=201)


@routes.post("/v1/servers/{id}/actions/create_image")
async def create_image(request: web.Request) -> web.Response:
    project, server = _server_for_request(request)
    body = await read_json(request)
    image_type = body.get("type") or "snapshot"
    if image_type not in ("snapshot", "backup"):
        raise invalid_input({"type": ["must be snapshot or backup"]})
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_input({"description": ["must be a string"]})
    labels = validate_labels(body.get("labels", {}))
    if server.locked:
        raise locked(server.id)
    image = Image(
        id=project.next_image_id(),
        type=image_type,
        name=None,
        description=description or f"{server.name}-{time.strftime('%Y%m%d%H%M%S')}",
        os_flavor=server.image.os_flavor,
        os_version=server.image.os_version,
        architecture=server.server_type["architecture"],
        disk_size=server.server_type["disk"],
        labels=labels,
        status="creating",
        created_from={"id": server.id, "name": server.name},
        bound_to=server.id if image_type == "backup" else None,
    )
    project.images[image.id] = image
    action = project.server_action(server, "create_image", project.durations.create_image)
    action.resources.append({"id": image.id, "type": "image"})

    async def work() -> None:
        disk = getattr(project.machines.get(server.id), "disk_path", None)
        used = disk.stat().st_blocks * 512 if disk is not None and disk.exists() else 0
        image.image_size = round(used / 1e9, 3)
        image.status = "available"

    def failed() -> None:
        image.status = "unavailable"

    project.run_on_server(server, [(action, work)], on_failure=failed)
    return json_response({"image": image.to_json(), "action": action.to_json()}, status=201)


@routes.route("*", "/v1/servers/{id}/actions/{command}")
async def unknown_server_action(request: web.Request) -> web.Response:
    raise not_found("server action", request.match_info["command"])
