"""`/locations` (and the deprecated `/datacenters`, still part of every server's JSON)."""

from __future__ import annotations

from aiohttp import web

from .errors import not_found
from .query import json_response, paginate, path_id, sort_items
from .state import LOCATIONS, datacenter_json, location_json

routes = web.RouteTableDef()


@routes.get("/v1/locations")
async def list_locations(request: web.Request) -> web.Response:
    name = request.query.get("name")
    items = [loc for loc in LOCATIONS if name is None or loc["name"] == name]
    items = sort_items(request, items, {"id": lambda loc: loc["id"], "name": lambda loc: loc["name"]})
    page, meta = paginate(request, items)
    return json_response({"locations": [location_json(loc) for loc in page], "meta": meta})


@routes.get("/v1/locations/{id}")
async def get_location(request: web.Request) -> web.Response:
    location_id = path_id(request)
    for loc in LOCATIONS:
        if loc["id"] == location_id:
            return json_response({"location": location_json(loc)})
    raise not_found("location", location_id)


@routes.get("/v1/datacenters")
async def list_datacenters(request: web.Request) -> web.Response:
    name = request.query.get("name")
    items = [loc for loc in LOCATIONS if name is None or loc["dc"] == name]
    page, meta = paginate(request, items)
    return json_response({"datacenters": [datacenter_json(loc) for loc in page], "recommendation": 1, "meta": meta})
