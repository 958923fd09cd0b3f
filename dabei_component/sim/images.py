"""`/images`: system images plus snapshots made by `create_image`; list filters, get, update, delete."""

from __future__ import annotations

from aiohttp import web

from .errors import ApiError, invalid_input, not_found
from .project import PROJECT
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
from .state import Image

routes = web.RouteTableDef()

IMAGE_TYPES = ("system", "app", "snapshot", "backup")
IMAGE_STATUSES = ("available", "creating", "unavailable")


@routes.get("/v1/images")
async def list_images(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    types = enum_list_param(request, "type", IMAGE_TYPES)
    statuses = enum_list_param(request, "status", IMAGE_STATUSES)
    architecture = request.query.get("architecture")
    if architecture is not None and architecture not in ("x86", "arm"):
        raise invalid_input({"architecture": ["must be x86 or arm"]})
    name = request.query.get("name")
    bound_to = request.query.getall("bound_to", [])
    selector = compile_label_selector(request.query.get("label_selector"))
    items = [
        image
        for image in project.images.values()
        if (not types or image.type in types)
        and (not statuses or image.status in statuses)
        and (architecture is None or image.architecture == architecture)
        and (name is None or image.name == name)
        and (not bound_to or str(image.bound_to) in bound_to)
        and selector(image.labels)
    ]
    items = sort_items(
        request,
        items,
        {"id": lambda i: i.id, "name": lambda i: i.name or "", "created": lambda i: i.created},
    )
    page, meta = paginate(request, items)
    return json_response({"images": [image.to_json() for image in page], "meta": meta})


def _get(request: web.Request) -> Image:
    image_id = path_id(request)
    image = request.app[PROJECT].images.get(image_id)
    if image is None:
        raise not_found("image", image_id)
    return image


@routes.get("/v1/images/{id}")
async def get_image(request: web.Request) -> web.Response:
    return json_response({"image": _get(request).to_json()})


@routes.put("/v1/images/{id}")
async def update_image(request: web.Request) -> web.Response:
    image = _get(request)
    body = await read_json(request)
    if image.type == "system":
        raise ApiError("forbidden", f"system image {image.id} cannot be changed")
    description = body.get("description", image.description)
    if not isinstance(description, str):
        raise invalid_input({"description": ["must be a string"]})
    new_type = body.get("type", image.type)
    if new_type != "snapshot" and new_type != image.type:
        raise invalid_input({"type": ["can only be converted to snapshot"]})
    labels = validate_labels(body["labels"]) if "labels" in body else image.labels
    image.description, image.type, image.labels = description, new_type, labels
    return json_response({"image": image.to_json()})


@routes.delete("/v1/images/{id}")
async def delete_image(request: web.Request) -> web.Response:
    image = _get(request)
    if image.type == "system":
        raise ApiError("forbidden", f"system image {image.id} cannot be deleted")
    del request.app[PROJECT].images[image.id]
    return web.Response(status=204)
