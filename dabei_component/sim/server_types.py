"""`/server_types`: the catalog of machine sizes (disk sizes in GB size the simulated disks)."""

from __future__ import annotations

from aiohttp import web

from .errors import not_found
from .query import json_response, paginate, path_id
from .state import SERVER_TYPES, server_type_json

routes = web.RouteTableDef()


@routes.get("/v1/server_types")
async def list_server_types(request: web.Request) -> web.Response:
    name = request.query.get("name")
    items = [st for st in SERVER_TYPES if name is None or st["name"] == name]
    page, meta = paginate(request, items)
    return json_response({"server_types": [server_type_json(st) for st in page], "meta": meta})


@routes.get("/v1/server_types/{id}")
async def get_server_type(request: web.Request) -> web.Response:
    type_id = path_id(request)
    for st in SERVER_TYPES:
        if st["id"] == type_id:
            return json_response({"server_type": server_type_json(st)})
    raise not_found("server_type", type_id)
