"""Control API of the simulator, under `/_sim/` with the same bearer token as the API.

- `GET /_sim/durations`, `PUT /_sim/durations` (partial: `{"boot": 0.5, ...}`): action durations in seconds
  (`create`, `boot`, `shutdown`, `poweroff`, `reboot`, `reset`, `rescue_enable`, `rescue_disable`,
  `create_image`, `delete`), `rescue_expiry` (how long enabled rescue lasts without a boot) and `rebuild`
  (how long each `nixos-rebuild` of an installed system takes; read when the system boots).
- `GET /_sim/faults`, `PUT /_sim/faults` (replaces all), `DELETE /_sim/faults` (clears): API faults, see
  `faults.py` for the body: error answers (any status and code, 429 with `RateLimit-Reset`) for a route
  pattern and method, failing actions per command (`create_server`, `start_server`, `stop_server`,
  `shutdown_server`, `reboot_server`, `reset_server`, `enable_rescue`, `disable_rescue`, `create_image`,
  `delete_server`), slow actions, metadata outages per server; each for the next N matches or T seconds.
- `GET /_sim/ratelimit`, `PUT /_sim/ratelimit` `{"limit": 3600, "period": 3600, "remaining": 10}`.
- `GET /_sim/uplink`, `PUT /_sim/uplink` `{"bits_per_second": 100e6 | null, "reset_counters": true}`: the
  deployer's uplink, one bandwidth shared by all connections to servers from outside the simulated servers
  (see `uplink.py`); the answer counts `deployer_bytes` and `server_bytes` (relays between servers).
- `GET /_sim/servers`, `GET /_sim/servers/{id}`: addresses, status, SSH keys given at create, rescue state,
  metadata URL, state dir and the machine's own description (`Machine.describe()`); never a password.
- `PUT /_sim/servers/{id}/faults`: SSH faults of the server's machine (`Machine.set_faults(body)`).
- `GET /_sim/flakes`, `PUT /_sim/flakes` (replaces all): what a configuration does once a host switched to
  it, by flake reference: `{"<flake ref>": {"ssh": "ok" | "refused", "health": "ok" | "failing", "session":
  "kept" | "cut"}}` (`ssh: refused`: sshd refuses root at login, open sessions go on; `health: failing`: the
  host's `app-health` command fails and its HTTP endpoint answers 503; `session: cut`: the switch cuts every
  open SSH connection). Read at each switch (`fake_rebuild.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from .errors import ApiError, invalid_input
from .fake_rebuild import BEHAVIOURS, read_behaviours
from .project import PROJECT, Project
from .query import json_response, path_id, read_json
from .state import Server, iso

routes = web.RouteTableDef()


@routes.get("/_sim/durations")
async def get_durations(request: web.Request) -> web.Response:
    return json_response({"durations": request.app[PROJECT].durations.to_json()})


@routes.put("/_sim/durations")
async def put_durations(request: web.Request) -> web.Response:
    durations = request.app[PROJECT].durations
    durations.update(await read_json(request))
    return json_response({"durations": durations.to_json()})


@routes.get("/_sim/faults")
async def get_faults(request: web.Request) -> web.Response:
    return json_response({"faults": request.app[PROJECT].faults.to_json()})


@routes.put("/_sim/faults")
async def put_faults(request: web.Request) -> web.Response:
    faults = request.app[PROJECT].faults
    faults.replace(await read_json(request))
    return json_response({"faults": faults.to_json()})


@routes.delete("/_sim/faults")
async def delete_faults(request: web.Request) -> web.Response:
    faults = request.app[PROJECT].faults
    faults.clear()
    return json_response({"faults": faults.to_json()})


@routes.get("/_sim/ratelimit")
async def get_ratelimit(request: web.Request) -> web.Response:
    return json_response({"ratelimit": request.app[PROJECT].ratelimit.to_json()})


@routes.put("/_sim/ratelimit")
async def put_ratelimit(request: web.Request) -> web.Response:
    ratelimit = request.app[PROJECT].ratelimit
    ratelimit.configure(await read_json(request))
    return json_response({"ratelimit": ratelimit.to_json()})


@routes.get("/_sim/uplink")
async def get_uplink(request: web.Request) -> web.Response:
    return json_response({"uplink": request.app[PROJECT].uplink.to_json()})


@routes.put("/_sim/uplink")
async def put_uplink(request: web.Request) -> web.Response:
    uplink = request.app[PROJECT].uplink
    try:
        uplink.configure(await read_json(request))
    except ValueError as exc:
        raise invalid_input({"uplink": [str(exc)]}) from None
    return json_response({"uplink": uplink.to_json()})


def server_details(project: Project, server: Server) -> dict[str, Any]:
    machine = project.machines.get(server.id)
    return {
        "id": server.id,
        "name": server.name,
        "status": server.status,
        "locked": server.locked,
        "ipv4": server.ipv4,
        "ipv6_network": server.ipv6_net,
        "ipv6_address": server.ipv6_address,
        "mac": server.mac,
        "ssh_port": project.ssh_port,
        "ssh_key_ids": list(server.ssh_key_ids),
        # Settings given at create or by actions, as the API shows them (GET /servers/{id} has them too).
        "private_net": [dict(n) for n in server.private_net],
        "placement_group_id": server.placement_group_id,
        "protection": dict(server.protection),
        "backup_window": server.backup_window,
        "rescue_enabled": server.rescue_enabled,
        "rescue_expires": iso(server.rescue_expires),
        "metadata_url": project.metadata_url(server.id),
        "state_dir": str(project.state_dir / "servers" / str(server.id)),
        "machine": machine.describe() if machine is not None else None,
    }


def _server(request: web.Request) -> tuple[Project, Server]:
    project = request.app[PROJECT]
    return project, project.server(path_id(request))


@routes.get("/_sim/servers")
async def list_servers(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    return json_response({"servers": [server_details(project, s) for s in project.servers.values()]})


@routes.get("/_sim/servers/{id}")
async def get_server(request: web.Request) -> web.Response:
    project, server = _server(request)
    return json_response({"server": server_details(project, server)})


@routes.put("/_sim/servers/{id}/faults")
async def put_server_faults(request: web.Request) -> web.Response:
    project, server = _server(request)
    machine = project.machines.get(server.id)
    if machine is None:
        raise ApiError("conflict", f"server {server.id} has no machine yet (still being created)")
    body = await read_json(request)
    try:
        machine.set_faults(body)
    except ValueError as exc:
        raise invalid_input({"faults": [str(exc)]}) from None
    return json_response({"server": server_details(project, server)})


_BEHAVIOUR_VALUES = {"ssh": ("ok", "refused"), "health": ("ok", "failing"), "session": ("kept", "cut")}


@routes.get("/_sim/flakes")
async def get_flakes(request: web.Request) -> web.Response:
    return json_response({"flakes": read_behaviours(request.app[PROJECT].flake_behaviours_path)})


@routes.put("/_sim/flakes")
async def put_flakes(request: web.Request) -> web.Response:
    body = await read_json(request)
    problems = []
    if not isinstance(body, dict):
        problems.append("expected a map of flake reference to behaviour")
        body = {}
    for flake, entry in body.items():
        if not isinstance(entry, dict):
            problems.append(f"{flake}: expected a map such as {{'ssh': 'refused'}}")
            continue
        for key, value in entry.items():
            if key not in BEHAVIOURS:
                problems.append(f"{flake}.{key}: unknown; known: {list(BEHAVIOURS)}")
            elif value not in _BEHAVIOUR_VALUES[key]:
                problems.append(f"{flake}.{key}: expected one of {list(_BEHAVIOUR_VALUES[key])}, got {value!r}")
    if problems:
        raise invalid_input({"flakes": problems})
    path = request.app[PROJECT].flake_behaviours_path
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return json_response({"flakes": body})
