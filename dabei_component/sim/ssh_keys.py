"""`/ssh_keys`: create, list (`name`, `fingerprint`, `label_selector`), get, update, delete."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

from aiohttp import web

from .errors import invalid_input, not_found, uniqueness
from .project import PROJECT
from .query import compile_label_selector, json_response, paginate, path_id, read_json, sort_items, validate_labels
from .state import SshKey

routes = web.RouteTableDef()

KEY_TYPES = {
    "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
}  # fmt: skip


def parse_public_key(text: object) -> tuple[str, str]:
    """Return (normalized "type base64 [comment]", MD5 fingerprint) or raise `invalid_input`."""
    if not isinstance(text, str) or not text.strip():
        raise invalid_input({"public_key": ["must be an OpenSSH public key line"]})
    parts = text.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise invalid_input({"public_key": ['is not an OpenSSH public key ("<type> <base64> [comment]")']})
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded_type = blob[4 : 4 + length].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise invalid_input({"public_key": ["key data is not valid base64 key material"]}) from None
    if embedded_type != parts[0]:
        raise invalid_input({"public_key": [f"key data is of type {embedded_type!r}, not {parts[0]!r}"]})
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    return " ".join(parts), fingerprint


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 128:
        raise invalid_input({"name": ["must be a non-empty string of at most 128 characters"]})
    return value


@routes.get("/v1/ssh_keys")
async def list_ssh_keys(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    name, fingerprint = request.query.get("name"), request.query.get("fingerprint")
    selector = compile_label_selector(request.query.get("label_selector"))
    items = [
        key
        for key in project.ssh_keys.values()
        if (name is None or key.name == name)
        and (fingerprint is None or key.fingerprint == fingerprint)
        and selector(key.labels)
    ]
    items = sort_items(request, items, {"id": lambda k: k.id, "name": lambda k: k.name})
    page, meta = paginate(request, items)
    return json_response({"ssh_keys": [key.to_json() for key in page], "meta": meta})


@routes.post("/v1/ssh_keys")
async def create_ssh_key(request: web.Request) -> web.Response:
    project = request.app[PROJECT]
    body = await read_json(request)
    missing = [field for field in ("name", "public_key") if field not in body]
    if missing:
        raise invalid_input({field: ["is required"] for field in missing})
    name = _name(body["name"])
    public_key, fingerprint = parse_public_key(body["public_key"])
    labels = validate_labels(body.get("labels", {}))
    for key in project.ssh_keys.values():
        if key.name == name:
            raise uniqueness("name", f"SSH key with name {name!r} already exists")
        if key.fingerprint == fingerprint:
            raise uniqueness("public_key", f"SSH key with fingerprint {fingerprint} already exists")
    key = SshKey(project.next_ssh_key_id(), name, public_key, fingerprint, labels)
    project.ssh_keys[key.id] = key
    return json_response({"ssh_key": key.to_json()}, status=201)


def _get(request: web.Request) -> SshKey:
    key_id = path_id(request)
    key = request.app[PROJECT].ssh_keys.get(key_id)
    if key is None:
        raise not_found("ssh_key", key_id)
    return key


@routes.get("/v1/ssh_keys/{id}")
async def get_ssh_key(request: web.Request) -> web.Response:
    return json_response({"ssh_key": _get(request).to_json()})


@routes.put("/v1/ssh_keys/{id}")
async def update_ssh_key(request: web.Request) -> web.Response:
    key = _get(request)
    body = await read_json(request)
    name = _name(body["name"]) if "name" in body else key.name
    labels = validate_labels(body["labels"]) if "labels" in body else key.labels
    if any(other.name == name and other.id != key.id for other in request.app[PROJECT].ssh_keys.values()):
        raise uniqueness("name", f"SSH key with name {name!r} already exists")
    key.name, key.labels = name, labels
    return json_response({"ssh_key": key.to_json()})


@routes.delete("/v1/ssh_keys/{id}")
async def delete_ssh_key(request: web.Request) -> web.Response:
    key = _get(request)
    del request.app[PROJECT].ssh_keys[key.id]
    return web.Response(status=204)
