"""API-side fault injection: error answers for routes, failing and slow actions, metadata outages.

Each fault lasts for the next `count` matches or for `seconds` from when it was set (exactly one of them).
The JSON form (what `PUT /_sim/faults` takes and `GET /_sim/faults` shows):

    {"api": [{"method": "POST", "path": "/servers/{id}/actions/reset", "status": 503,
              "code": "service_error", "message": "...", "count": 2}],
     "actions": [{"command": "reset", "code": "action_failed", "message": "...", "count": 1}],
     "slow_actions": [{"command": "*", "extra_seconds": 2.0, "seconds": 30}],
     "metadata": [{"server_id": 42, "status": 503, "count": 3}]}

`path` is a glob matched against the route template relative to `/v1` (`/servers/{id}`) and against the
request path (`/servers/17`); `method` and `command` may be `*`. A 429 api fault answers like an empty
rate-limit budget (`RateLimit-Remaining: 0`, `RateLimit-Reset` `reset_seconds` ahead, default 1).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any

from .errors import STATUS_BY_CODE, invalid_input


@dataclass
class _Lifetime:
    count: int | None
    until: float | None

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> _Lifetime:
        count, seconds = raw.get("count"), raw.get("seconds")
        if (count is None) == (seconds is None):
            raise invalid_input({where: ["give exactly one of count or seconds"]})
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise invalid_input({f"{where}.count": ["must be a positive integer"]})
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0):
            raise invalid_input({f"{where}.seconds": ["must be a positive number"]})
        return cls(count, None if seconds is None else time.time() + float(seconds))

    def alive(self, now: float) -> bool:
        return (self.count is None or self.count > 0) and (self.until is None or now < self.until)

    def spend(self) -> None:
        if self.count is not None:
            self.count -= 1

    def to_json(self) -> dict[str, Any]:
        if self.count is not None:
            return {"count": self.count}
        assert self.until is not None
        return {"seconds": max(0.0, round(self.until - time.time(), 3))}


def _string(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise invalid_input({f"{where}.{key}": ["must be a non-empty string"]})
    return value


def _number(raw: dict[str, Any], key: str, where: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise invalid_input({f"{where}.{key}": ["must be a non-negative number"]})
    return float(value)


def _check_keys(raw: object, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise invalid_input({where: ["must be an object"]})
    unknown = set(raw) - allowed - {"count", "seconds"}
    if unknown:
        raise invalid_input({where: [f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"]})
    return raw


@dataclass
class ApiFault:
    method: str
    path: str
    status: int
    code: str
    message: str
    reset_seconds: float
    life: _Lifetime

    @classmethod
    def parse(cls, raw: object, where: str) -> ApiFault:
        spec = _check_keys(raw, {"method", "path", "status", "code", "message", "reset_seconds"}, where)
        code = _string(spec, "code", where, "service_error")
        status = spec.get("status", STATUS_BY_CODE.get(code, 503))
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise invalid_input({f"{where}.status": ["must be an HTTP error status 400..599"]})
        return cls(
            method=_string(spec, "method", where, "*").upper(),
            path=_string(spec, "path", where),
            status=status,
            code=code,
            message=_string(spec, "message", where, f"injected fault: {code}"),
            reset_seconds=_number(spec, "reset_seconds", where, 1.0),
            life=_Lifetime.parse(spec, where),
        )

    def matches(self, method: str, template: str, path: str) -> bool:
        return (self.method in ("*", method)) and (
            fnmatch.fnmatchcase(template, self.path) or fnmatch.fnmatchcase(path, self.path)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "path": self.path, "status": self.status, "code": self.code,
            "message": self.message, "reset_seconds": self.reset_seconds, **self.life.to_json(),
        }  # fmt: skip


@dataclass
class ActionFault:
    command: str
    code: str
    message: str
    life: _Lifetime

    @classmethod
    def parse(cls, raw: object, where: str) -> ActionFault:
        spec = _check_keys(raw, {"command", "code", "message"}, where)
        return cls(
            command=_string(spec, "command", where),
            code=_string(spec, "code", where, "action_failed"),
            message=_string(spec, "message", where, "injected action failure"),
            life=_Lifetime.parse(spec, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "code": self.code, "message": self.message, **self.life.to_json()}


@dataclass
class SlowAction:
    command: str
    extra_seconds: float
    life: _Lifetime

    @classmethod
    def parse(cls, raw: object, where: str) -> SlowAction:
        spec = _check_keys(raw, {"command", "extra_seconds"}, where)
        return cls(
            command=_string(spec, "command", where, "*"),
            extra_seconds=_number(spec, "extra_seconds", where, 1.0),
            life=_Lifetime.parse(spec, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "extra_seconds": self.extra_seconds, **self.life.to_json()}


@dataclass
class MetadataOutage:
    server_id: int
    status: int
    life: _Lifetime

    @classmethod
    def parse(cls, raw: object, where: str) -> MetadataOutage:
        spec = _check_keys(raw, {"server_id", "status"}, where)
        server_id, status = spec.get("server_id"), spec.get("status", 503)
        if isinstance(server_id, bool) or not isinstance(server_id, int):
            raise invalid_input({f"{where}.server_id": ["must be a server ID"]})
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise invalid_input({f"{where}.status": ["must be an HTTP error status 400..599"]})
        return cls(server_id, status, _Lifetime.parse(spec, where))

    def to_json(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "status": self.status, **self.life.to_json()}


class Faults:
    def __init__(self) -> None:
        self.api: list[ApiFault] = []
        self.actions: list[ActionFault] = []
        self.slow_actions: list[SlowAction] = []
        self.metadata: list[MetadataOutage] = []

    def replace(self, body: object) -> None:
        """Replace every fault with the ones in `body` (validated as a whole before anything changes)."""
        if not isinstance(body, dict):
            raise invalid_input({"faults": ["must be an object with api, actions, slow_actions, metadata"]})
        kinds: dict[str, Any] = {
            "api": ApiFault,
            "actions": ActionFault,
            "slow_actions": SlowAction,
            "metadata": MetadataOutage,
        }
        unknown = set(body) - set(kinds)
        if unknown:
            raise invalid_input({key: [f"unknown fault kind; known: {sorted(kinds)}"] for key in unknown})
        parsed: dict[str, list[Any]] = {}
        for kind, parser in kinds.items():
            items = body.get(kind, [])
            if not isinstance(items, list):
                raise invalid_input({kind: ["must be a list"]})
            parsed[kind] = [parser.parse(item, f"{kind}[{i}]") for i, item in enumerate(items)]
        self.api, self.actions = parsed["api"], parsed["actions"]
        self.slow_actions, self.metadata = parsed["slow_actions"], parsed["metadata"]

    def clear(self) -> None:
        self.replace({})

    def take_api_fault(self, method: str, template: str, path: str) -> ApiFault | None:
        now = time.time()
        for fault in self.api:
            if fault.life.alive(now) and fault.matches(method, template, path):
                fault.life.spend()
                return fault
        return None

    def take_action_failure(self, command: str) -> ActionFault | None:
        now = time.time()
        for fault in self.actions:
            if fault.life.alive(now) and fault.command in ("*", command):
                fault.life.spend()
                return fault
        return None

    def take_action_delay(self, command: str) -> float:
        now = time.time()
        for fault in self.slow_actions:
            if fault.life.alive(now) and fault.command in ("*", command):
                fault.life.spend()
                return fault.extra_seconds
        return 0.0

    def take_metadata_outage(self, server_id: int) -> int | None:
        now = time.time()
        for fault in self.metadata:
            if fault.life.alive(now) and fault.server_id == server_id:
                fault.life.spend()
                return fault.status
        return None

    def to_json(self) -> dict[str, Any]:
        now = time.time()
        return {
            "api": [f.to_json() for f in self.api if f.life.alive(now)],
            "actions": [f.to_json() for f in self.actions if f.life.alive(now)],
            "slow_actions": [f.to_json() for f in self.slow_actions if f.life.alive(now)],
            "metadata": [f.to_json() for f in self.metadata if f.life.alive(now)],
        }
