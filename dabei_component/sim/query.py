"""Request parsing shared by every API domain: labels, label selectors, pagination, sorting, ids."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from .errors import ApiError, invalid_input

T = TypeVar("T")

MAX_PER_PAGE = 50
DEFAULT_PER_PAGE = 25

_LABEL_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?)?$")


def label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not _LABEL_PREFIX.match(prefix) or len(prefix) > 253):
        return f"label key {key!r} has an invalid prefix"
    if prefix == "hetzner.cloud" or prefix.endswith(".hetzner.cloud"):
        return f"label key {key!r} uses the reserved prefix hetzner.cloud"
    if not _LABEL_NAME.match(name):
        return f"label key {key!r} is not a valid label name"
    return None


def validate_labels(value: object, field: str = "labels") -> dict[str, str]:
    if not isinstance(value, dict):
        raise invalid_input({field: ["must be an object of string keys and string values"]})
    problems: list[str] = []
    for key, val in value.items():
        if not isinstance(val, str):
            problems.append(f"label {key!r} must have a string value")
            continue
        problem = label_key_problem(key)
        if problem:
            problems.append(problem)
        if not _LABEL_VALUE.match(val):
            problems.append(f"label value {val!r} of {key!r} is not a valid label value")
    if problems:
        raise invalid_input({field: problems})
    return dict(value)


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value lists."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts]


_SET_EXPR = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_EXPR = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")
_EXISTS_EXPR = re.compile(r"^(?P<neg>!)?\s*(?P<key>[^\s!=(),]+)$")

LabelPredicate = Callable[[dict[str, str]], bool]


def _compile_expression(expr: str) -> LabelPredicate:
    if match := _SET_EXPR.match(expr):
        key = match["key"]
        values = {v.strip() for v in match["values"].split(",")}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQ_EXPR.match(expr):
        key, value = match["key"], match["value"]
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS_EXPR.match(expr):
        key = match["key"]
        if match["neg"]:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise invalid_input({"label_selector": [f"cannot parse expression {expr!r}"]})


def compile_label_selector(selector: str | None) -> LabelPredicate:
    """Label selector as Hetzner documents it: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (..)`."""
    if selector is None or not selector.strip():
        return lambda labels: True
    predicates = [_compile_expression(expr) for expr in _split_selector(selector)]
    if any(not expr for expr in _split_selector(selector)):
        raise invalid_input({"label_selector": ["empty expression"]})
    return lambda labels: all(predicate(labels) for predicate in predicates)


def int_param(request: web.Request, name: str, default: int, minimum: int = 1) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_input({name: [f"must be an integer, got {raw!r}"]}) from None
    if value < minimum:
        raise invalid_input({name: [f"must be at least {minimum}"]})
    return value


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise invalid_input({name: [f"must be an integer ID, got {raw!r}"]}) from None
    if value < 1:
        raise invalid_input({name: ["must be a positive integer ID"]})
    return value


def id_list_param(request: web.Request, name: str = "id") -> list[int]:
    ids = []
    for raw in request.query.getall(name, []):
        try:
            ids.append(int(raw))
        except ValueError:
            raise invalid_input({name: [f"must be an integer ID, got {raw!r}"]}) from None
    return ids


def enum_list_param(request: web.Request, name: str, allowed: Sequence[str]) -> list[str]:
    values = request.query.getall(name, [])
    bad = [value for value in values if value not in allowed]
    if bad:
        raise invalid_input({name: [f"unknown value(s) {bad}; allowed: {list(allowed)}"]})
    return list(values)


def sort_items(request: web.Request, items: list[T], keys: dict[str, Callable[[T], Any]]) -> list[T]:
    """Apply `sort=field[:asc|:desc]` parameters (last one is the least significant)."""
    specs = request.query.getall("sort", [])
    for spec in reversed(specs):
        field, _, direction = spec.partition(":")
        if field not in keys or direction not in ("", "asc", "desc"):
            raise invalid_input({"sort": [f"unknown sort {spec!r}; allowed fields: {sorted(keys)}"]})
        items = sorted(items, key=keys[field], reverse=direction == "desc")
    return items


def paginate(request: web.Request, items: list[T]) -> tuple[list[T], dict[str, Any]]:
    """Slice one page and build `meta` exactly as Hetzner does (`meta.pagination`)."""
    page = int_param(request, "page", 1)
    per_page = min(int_param(request, "per_page", DEFAULT_PER_PAGE), MAX_PER_PAGE)
    total = len(items)
    last_page = max(1, -(-total // per_page))
    start = (page - 1) * per_page
    pagination = {
        "page": page,
        "per_page": per_page,
        "previous_page": page - 1 if page > 1 else None,
        "next_page": page + 1 if page < last_page else None,
        "last_page": last_page,
        "total_entries": total,
    }
    return items[start : start + per_page], {"pagination": pagination}


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; an empty body is an empty object."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError("json_error", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("json_error", "request body must be a JSON object")
    return body


def json_response(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)
