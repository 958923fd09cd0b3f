"""API errors in the Hetzner Cloud shape: `{"error": {"code", "message", "details"}}` with its HTTP status."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

# HTTP status per error code, as the Hetzner Cloud API documents them.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "json_error": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "resource_limit_exceeded": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "uniqueness_error": 409,
    "conflict": 409,
    "resource_unavailable": 412,
    "unsupported_error": 422,
    "locked": 423,
    "protected": 423,
    "rate_limit_exceeded": 429,
    "server_error": 500,
    "service_error": 503,
    "maintenance": 503,
    "unavailable": 503,
    "timeout": 504,
}


class ApiError(Exception):
    """An error answered to the client; `status` defaults to the documented one for `code`."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 400)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def invalid_input(fields: dict[str, list[str]]) -> ApiError:
    """`invalid_input` naming each bad field with its messages, as Hetzner's `details.fields` does."""
    names = ", ".join(sorted(fields))
    return ApiError(
        "invalid_input",
        f"invalid input in field(s): {names}",
        {"fields": [{"name": name, "messages": messages} for name, messages in fields.items()]},
    )


def not_found(resource: str, ident: object) -> ApiError:
    return ApiError("not_found", f"{resource} with ID {ident} not found")


def uniqueness(field: str, message: str) -> ApiError:
    return ApiError("uniqueness_error", message, {"fields": [{"name": field}]})


def locked(server_id: int) -> ApiError:
    return ApiError("locked", f"server {server_id} is locked by a running action")
