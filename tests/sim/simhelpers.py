"""Helpers for the simulator's API tests.

Every API response of every simulator started here goes through `OpenApiRecorder`, which validates it
against the response schema of its operation in `../shared/hcloud-openapi/hcloud.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from dabei_component.sim import Durations, Simulator
from dabei_component.sim.app import ObservedResponse
from dabei_component.sim.client import free_port
from dabei_component.sim.threaded import SimulatorThread as SimThread

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED = PROJECT_ROOT / ".." / "shared"
OPENAPI = SHARED / "hcloud-openapi" / "hcloud.json"


def _openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` means "or null" in JSON Schema."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _openapi_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@dataclass
class OpenApiRecorder:
    """Validates each observed API response against its operation's schema and keeps the verdicts."""

    spec: dict[str, Any]
    schemas: dict[str, Any]
    checked: list[tuple[str, str, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls) -> OpenApiRecorder:
        spec = json.loads(OPENAPI.read_text())
        return cls(spec=spec, schemas=_openapi_to_json_schema(spec["components"]["schemas"]))

    def _response_schema(self, obs: ObservedResponse) -> dict[str, Any] | None:
        """The JSON schema for this response, or None when the operation documents no body."""
        operation = self.spec["paths"].get(obs.route or "", {}).get(obs.method.lower())
        if operation is None:
            if obs.status >= 400:  # unknown endpoints answer the documented error shape
                return {"$ref": "#/components/schemas/error_response"}
            raise AssertionError(f"{obs.method} {obs.path}: no such operation in the OpenAPI document")
        responses = operation["responses"]
        documented = responses.get(str(obs.status)) or responses.get(f"{str(obs.status)[0]}xx")
        if documented is None:
            raise AssertionError(f"{obs.method} {obs.route}: status {obs.status} is not documented")
        content = documented.get("content", {}).get("application/json")
        return None if content is None else _openapi_to_json_schema(content["schema"])

    def observe(self, obs: ObservedResponse) -> None:
        try:
            schema = self._response_schema(obs)
            if schema is None:
                assert not obs.body, f"{obs.method} {obs.route} {obs.status}: body where none is documented"
            else:
                assert obs.content_type == "application/json", f"content type {obs.content_type}"
                jsonschema.Draft202012Validator({**schema, "components": {"schemas": self.schemas}}).validate(
                    json.loads(obs.body)
                )
        except (AssertionError, jsonschema.ValidationError, ValueError) as exc:
            message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
            with self._lock:
                self.failures.append(f"{obs.method} {obs.path} -> {obs.status}: {message}")
        with self._lock:
            self.checked.append((obs.method, obs.route or obs.path, obs.status))


RECORDER = OpenApiRecorder.load()


def make_sim(state_dir: Path | None, **kwargs: Any) -> SimThread:
    kwargs.setdefault("ssh_port", free_port("127.77.0.1"))
    kwargs.setdefault("durations", Durations(create=0.1, boot=0.05, reset=0.05, reboot=0.05, delete=0.05))
    return SimThread(Simulator(state_dir=state_dir, response_observer=RECORDER.observe, **kwargs))


def sim_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a state directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def loop_devices_under(directory: str) -> list[str]:
    result = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True, check=True)
    devices = json.loads(result.stdout or '{"loopdevices": []}')["loopdevices"]
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(directory)]


# hcloud types every attribute as optional; these fail loudly where the API left one out.
def ident(resource: Any) -> int:
    assert resource.id is not None, f"{resource!r} has no id"
    return int(resource.id)


def key_ids(*keys: Any) -> Any:
    """SSH key IDs for `enable_rescue` (the library annotates them as strings; the API takes integers)."""
    return [ident(key) for key in keys]


def ipv4(server: Any) -> str:
    assert server.public_net is not None and server.public_net.ipv4 is not None
    return str(server.public_net.ipv4.ip)


def ipv6_network(server: Any) -> str:
    assert server.public_net is not None and server.public_net.ipv6 is not None
    return str(server.public_net.ipv6.ip)
