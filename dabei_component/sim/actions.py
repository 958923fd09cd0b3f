"""`/actions`: get by ID and list filtered by repeated `id` parameters (how the Go client polls)."""

from __future__ import annotations

from aiohttp import web

from .errors import not_found
from .project import PROJECT
from .query import enum_list_param, id_list_param, json_response, paginate, path_id, sort_items
from .state import Action

routes = web.RouteTableDef()

ACTION_STATUSES = ("running", "success", "error")
ACTION_SORT_KEYS = {
    "id": lambda a: a.id,
    "command": lambda a: a.command,
    "status": lambda a: a.status,
    "started": lambda a: a.started,
    "finished": lambda a: a.finished or 0.0,
}


def list_actions_response(request: web.Request, actions: list[Action]) -> web.Response:
    """Filter by `id` and `status`, sort, paginate: shared by `/actions` and `/servers/{id}/actions`."""
    ids = set(id_list_param(request))
    statuses = enum_list_param(request, "status", ACTION_STATUSES)
    items = [
        action for action in actions if (not ids or action.id in ids) and (not statuses or action.status in statuses)
    ]
    items = sort_items(request, sorted(items, key=lambda a: a.id), ACTION_SORT_KEYS)
    page, meta = paginate(request, items)
    return json_response({"actions": [action.to_json() for action in page], "meta": meta})


@routes.get("/v1/actions")
async def get_multiple_actions(request: web.Request) -> web.Response:
    return list_actions_response(request, list(request.app[PROJECT].actions.values()))


@routes.get("/v1/actions/{id}")
async def get_action(request: web.Request) -> web.Response:
    action_id = path_id(request)
    action = request.app[PROJECT].actions.get(action_id)
    if action is None:
        raise not_found("action", action_id)
    return json_response({"action": action.to_json()})
