"""The few Hetzner Cloud calls the steps need, over the official `hcloud` library.

The library already retries rate limits and gateway errors a few times; this wrapper adds what a step that
runs for minutes needs on top: retrying `locked` (another action runs on the server) and transient server
errors until the step's own deadline, and error messages that name the server and the call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hcloud import APIException, Client
from hcloud.actions import BoundAction
from hcloud.servers import Server
from hcloud.ssh_keys import SSHKey

T = TypeVar("T")

# Errors worth another try: the server is busy, the API is briefly unavailable, or the budget is spent.
_RETRYABLE_CODES = {"locked", "rate_limit_exceeded", "conflict", "timeout", "service_error", "unavailable"}
_RETRYABLE_STATUS = {500, 502, 503, 504}


class HetznerError(RuntimeError):
    """A Hetzner Cloud call failed for good; the message names the server and the call."""


@dataclass(frozen=True)
class ServerInfo:
    id: int
    name: str
    status: str
    ipv4: str | None
    ipv6: str | None
    rescue_enabled: bool
    disk_bytes: int


def _retryable(exc: APIException) -> bool:
    return exc.code in _RETRYABLE_CODES or exc.code in _RETRYABLE_STATUS


class HetznerApi:
    """Deadline-aware calls for one provider run. Holds the token only in memory, never in state."""

    def __init__(self, token: str, endpoint: str | None = None, *, poll_interval: float = 1.0) -> None:
        kwargs = {"api_endpoint": endpoint} if endpoint else {}
        self._client = Client(
            token=token, application_name="nix-dabei", poll_interval=poll_interval, timeout=30, **kwargs
        )
        self._poll_interval = poll_interval

    def _call(self, what: str, fn: Callable[[], T], deadline: float) -> T:
        delay = self._poll_interval
        while True:
            try:
                return fn()
            except APIException as exc:
                if not _retryable(exc) or time.monotonic() + delay > deadline:
                    raise HetznerError(f"{what}: {exc.code}: {exc.message}") from None
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def server(self, server_id: int, deadline: float) -> ServerInfo:
        s = self._call(f"get server {server_id}", lambda: self._client.servers.get_by_id(server_id), deadline)
        return ServerInfo(
            id=s.id,
            name=s.name,
            status=s.status,
            ipv4=s.public_net.ipv4.ip if s.public_net and s.public_net.ipv4 else None,
            ipv6=s.public_net.ipv6.ip if s.public_net and s.public_net.ipv6 else None,
            rescue_enabled=bool(s.rescue_enabled),
            disk_bytes=int(s.server_type.disk) * 1000**3,
        )

    def ssh_key_id(self, name_or_id: str | int, deadline: float) -> int:
        def lookup() -> SSHKey | None:
            if isinstance(name_or_id, int) or str(name_or_id).isdigit():
                return self._client.ssh_keys.get_by_id(int(name_or_id))
            return self._client.ssh_keys.get_by_name(str(name_or_id))

        key = self._call(f"find SSH key {name_or_id!r}", lookup, deadline)
        if key is None or key.id is None:
            raise HetznerError(f"SSH key {name_or_id!r} does not exist in this Hetzner project")
        return key.id

    def _wait(self, what: str, action: BoundAction, deadline: float) -> None:
        while True:
            action.reload()
            if action.status == "success":
                return
            if action.status == "error":
                err = action.error or {}
                raise HetznerError(f"{what}: action {action.id} failed: {err.get('code')}: {err.get('message')}")
            if time.monotonic() + self._poll_interval > deadline:
                raise HetznerError(f"{what}: action {action.id} still running at the step's deadline")
            time.sleep(self._poll_interval)

    def _server_action(self, server_id: int, what: str, deadline: float, call: Callable[..., BoundAction]) -> None:
        label = f"{what} on server {server_id}"
        action = self._call(label, call, deadline)
        # The library hands back either a BoundAction or a response object that carries one.
        bound = action if isinstance(action, BoundAction) else action.action  # type: ignore[attr-defined]
        self._wait(label, bound, deadline)

    def enable_rescue(self, server_id: int, ssh_key_ids: list[int], deadline: float) -> None:
        """Enable the linux64 rescue system with the given keys; the root password it returns is dropped."""
        servers = self._client.servers
        self._server_action(
            server_id,
            "enable rescue",
            deadline,
            lambda: servers.enable_rescue(Server(id=server_id), type="linux64", ssh_keys=ssh_key_ids),  # type: ignore[arg-type]
        )

    def reset(self, server_id: int, deadline: float) -> None:
        self._server_action(server_id, "reset", deadline, lambda: self._client.servers.reset(Server(id=server_id)))

    def power_on(self, server_id: int, deadline: float) -> None:
        if self.server(server_id, deadline).status != "running":
            self._server_action(
                server_id, "power on", deadline, lambda: self._client.servers.power_on(Server(id=server_id))
            )
