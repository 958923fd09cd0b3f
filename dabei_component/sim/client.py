"""What callers of the simulator need: a free port for it, and its control API (`/_sim/...`)."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ControlClient:
    """The simulator's control API: durations, faults, and what each server's machine is doing."""

    def __init__(self, control_url: str, token: str) -> None:
        self.base = control_url.rstrip("/")
        self._token = token

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def server(self, server_id: int | str) -> dict[str, Any]:
        return self.request("GET", f"/servers/{int(server_id)}")["server"]

    def set_api_faults(self, faults: dict[str, Any]) -> None:
        self.request("PUT", "/faults", faults)

    def set_ssh_faults(self, server_id: int | str, faults: dict[str, Any]) -> None:
        self.request("PUT", f"/servers/{int(server_id)}/faults", faults)
