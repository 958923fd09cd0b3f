"""The aiohttp application: API under `/v1`, control API under `/_sim`, metadata under `/_metadata`."""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from . import actions, control, images, locations, metadata, networking, server_types, servers, ssh_keys
from .errors import ApiError
from .project import PROJECT, Project

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
CONTROL_PREFIX = "/_sim"


@dataclass(frozen=True)
class ObservedResponse:
    """One API response, as handed to a `Simulator(response_observer=...)` (tests validate them)."""

    method: str
    route: str | None  # template relative to /v1, e.g. "/servers/{id}"; None when no route matched
    path: str  # relative to /v1
    status: int
    content_type: str
    body: bytes


Observer = Callable[[ObservedResponse], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_template(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return resource.canonical.removeprefix(API_PREFIX)


def _as_api_error(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError("method_not_allowed", f"method {exc.method} is not allowed here", status=405)
    if isinstance(exc, web.HTTPNotFound):
        return ApiError("not_found", "no such API endpoint")
    return ApiError("invalid_input", exc.text or exc.reason, status=exc.status)


def build_app(project: Project, token: str, observer: Observer | None = None) -> web.Application:
    def authorized(request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    async def api(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Auth, injected faults and the rate limit, in the order the real API applies them."""
        if not authorized(request):
            raise ApiError("unauthorized", "unable to authenticate")
        path = request.path.removeprefix(API_PREFIX)
        fault = project.faults.take_api_fault(request.method, _route_template(request) or path, path)
        if fault is not None:
            headers = {}
            if fault.status == 429:
                headers = {
                    "RateLimit-Limit": str(project.ratelimit.limit),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(math.ceil(time.time() + fault.reset_seconds)),
                }
            raise ApiError(fault.code, fault.message, status=fault.status, headers=headers)
        if not project.ratelimit.take():
            raise ApiError("rate_limit_exceeded", "limit of requests per hour reached")
        return await handler(request)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_api = request.path.startswith(API_PREFIX + "/")
        if not is_api and not request.path.startswith(CONTROL_PREFIX + "/"):
            return await handler(request)
        try:
            if is_api:
                response = await api(request, handler)
            elif not authorized(request):
                raise ApiError("unauthorized", "unable to authenticate")
            else:
                response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            response = _as_api_error(exc).response()
        except Exception:  # a bug in the simulator still answers in the API's error shape
            log.exception("%s %s failed", request.method, request.path)
            response = ApiError("server_error", "internal simulator error", status=500).response()
        if is_api:
            for name, value in project.ratelimit.headers().items():
                response.headers.setdefault(name, value)
            if observer is not None and isinstance(response, web.Response):
                body = response.body if isinstance(response.body, bytes) else b""
                observer(
                    ObservedResponse(
                        method=request.method,
                        route=_route_template(request),
                        path=request.path.removeprefix(API_PREFIX),
                        status=response.status,
                        content_type=response.content_type,
                        body=body,
                    )
                )
        return response

    app = web.Application(middlewares=[middleware], client_max_size=1024**2)
    app[PROJECT] = project
    for module in (actions, networking, servers, ssh_keys, images, server_types, locations, control, metadata):
        app.router.add_routes(module.routes)
    return app
