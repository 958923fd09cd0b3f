"""The few Hetzner Cloud calls the steps need, over the official `hcloud` library.

Every call ends by the step's deadline: the library's own retries are switched off (hcloud-python 2.27 retries
rate limits, conflicts and gateway errors up to five times with a backoff of up to 60 s, which would keep
one call blocked past the deadline), each request's timeout is cut to the time left, and this wrapper
retries with backoff until the deadline. A call that fails for good names the server, the call and the
API's last answer (for a spent rate limit: when `RateLimit-Reset` says the budget is full again).

What is retried depends on what the answer says about the request:
- the API did not act on it (`locked`, `conflict`, `rate_limit_exceeded`, 503 `service_error`,
  `unavailable`, `maintenance`): retried for every call;
- it is unknown whether it took effect (500 `server_error`, 502, 504, `timeout`, a broken connection):
  retried only for calls that may be repeated (reads, enabling rescue, powering on). A reset is not
  repeated: a second reset could boot the server out of the rescue system the first one booted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests
from hcloud import APIException, Client
from hcloud.actions import BoundAction
from hcloud.servers import Server

T = TypeVar("T")

_NOT_PROCESSED: set[str | int] = {
    "locked",
    "conflict",
    "rate_limit_exceeded",
    "service_error",
    "unavailable",
    "maintenance",
    423,
    429,
    503,
}
_OUTCOME_UNKNOWN: set[str | int] = {"server_error", "bad_gateway", "timeout", 500, 502, 504}
_BACKOFF_MAX_SECONDS = 30.0
# One request's timeout (connect and read) when more of the deadline is left.
REQUEST_SECONDS = 30.0
# Actions after which a server no longer runs the system it ran before (a rescue session ends with them).
RESTART_COMMANDS = frozenset(
    {
        "start_server",
        "stop_server",
        "shutdown_server",
        "reboot_server",
        "reset_server",
        "rebuild_server",
        "change_server_type",
    }
)


class HetznerError(RuntimeError):
    """A Hetzner Cloud call failed for good; the message names the server and the call."""


# The Nix system of each architecture in Hetzner's server type catalog (`architecture` of
# GET /server_types: `x86` for CX, CPX, CCX, booting by BIOS; `arm` for CAX, booting by UEFI).
SYSTEMS = {"x86": "x86_64-linux", "arm": "aarch64-linux"}


@dataclass(frozen=True)
class ServerInfo:
    id: int
    name: str
    status: str
    ipv4: str | None
    ipv6: str | None
    rescue_enabled: bool
    disk_bytes: int
    locked: bool  # an action runs on the server
    server_type: str = ""
    architecture: str = ""  # the server type's: "x86" or "arm"


def _no_log(_message: str) -> None:
    pass


class _DeadlineSession(requests.Session):
    """The HTTP session under the `hcloud` client: each request ends by `deadline` (time.monotonic()), and
    the last response is kept for what the API said beyond its error body (the rate-limit headers)."""

    def __init__(self) -> None:
        super().__init__()
        self.deadline: float | None = None
        self.last: requests.Response | None = None

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise requests.Timeout("the step's deadline has passed")
            kwargs["timeout"] = min(left, REQUEST_SECONDS)
        self.last = None
        response = super().request(*args, **kwargs)
        self.last = response
        return response


def _rate_limit_note(response: requests.Response | None) -> str:
    """When a spent budget is full again, from the `RateLimit-Reset` header (UNIX seconds; Hetzner Cloud API
    reference, "Rate Limiting")."""
    reset = response.headers.get("RateLimit-Reset") if response is not None else None
    if reset is None or not reset.strip().isdigit():
        return ""
    when = datetime.fromtimestamp(int(reset), tz=UTC)
    seconds = max(0, round(int(reset) - time.time()))
    return f"; RateLimit-Reset says the budget is full again at {when:%Y-%m-%d %H:%M:%S} UTC (in {seconds} s)"


class HetznerApi:
    """Deadline-aware calls for one provider run. Holds the token only in memory, never in state."""

    def __init__(
        self,
        token: str,
        endpoint: str | None = None,
        *,
        poll_interval: float = 1.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"api_endpoint": endpoint} if endpoint else {}
        self._client = Client(
            token=token, application_name="nix-dabei", poll_interval=poll_interval, timeout=REQUEST_SECONDS, **kwargs
        )
        # hcloud-python 2.27 has no public setting for either (its `ClientBase`, pinned in pyproject.toml):
        # no retries of its own, and our session that bounds each request by the deadline.
        base = self._client._client
        if not hasattr(base, "_retry_max_retries") or not isinstance(getattr(base, "_session", None), requests.Session):
            raise RuntimeError("the hcloud library changed: adapt HetznerApi to bound its calls by the deadline")
        base._retry_max_retries = 0
        self._session = _DeadlineSession()
        base._session = self._session
        self._poll_interval = poll_interval
        self._log = log or _no_log

    def _call(self, what: str, fn: Callable[[], T], deadline: float, *, repeatable: bool = True) -> T:
        delay = self._poll_interval
        self._session.deadline = deadline
        error = ""
        while True:
            try:
                return fn()
            except APIException as exc:
                code, error = exc.code, f"{exc.code}: {exc.message}"
                if code == "rate_limit_exceeded" or code == 429:
                    error += _rate_limit_note(self._session.last)
            except requests.RequestException as exc:
                if time.monotonic() >= deadline:
                    # The deadline cut the request short: name the answer before it, if there was one.
                    last = f"{error} (still failing at the step's deadline)" if error else ""
                    raise HetznerError(f"{what}: {last or 'no answer from the API before the step deadline'}") from None
                code, error = "connection", f"no answer from the API ({type(exc).__name__})"
            retry = code in _NOT_PROCESSED or (repeatable and (code in _OUTCOME_UNKNOWN or code == "connection"))
            if not retry:
                unsafe = code in _OUTCOME_UNKNOWN or code == "connection"
                note = " (not retried: the request may have taken effect)" if unsafe else ""
                raise HetznerError(f"{what}: {error}{note}")
            if time.monotonic() + delay > deadline:
                raise HetznerError(f"{what}: {error} (still failing at the step's deadline)")
            self._log(f"{what}: {error}; retrying in {delay:g}s")
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_SECONDS)

    def server(self, server_id: int, deadline: float) -> ServerInfo:
        s = self._call(f"get server {server_id}", lambda: self._client.servers.get_by_id(server_id), deadline)
        return ServerInfo(
            id=server_id,
            name=s.name or "",
            status=s.status or "unknown",
            ipv4=s.public_net.ipv4.ip if s.public_net and s.public_net.ipv4 else None,
            ipv6=s.public_net.ipv6.ip if s.public_net and s.public_net.ipv6 else None,
            rescue_enabled=bool(s.rescue_enabled),
            disk_bytes=int(s.server_type.disk or 0) * 1000**3 if s.server_type else 0,
            locked=bool(s.locked),
            server_type=str(s.server_type.name or "") if s.server_type else "",
            architecture=str(s.server_type.architecture or "") if s.server_type else "",
        )

    def wait_unlocked(self, server_id: int, deadline: float) -> None:
        """Wait until no action runs on the server (one a crashed earlier run started, for example)."""
        while self.server(server_id, deadline).locked:
            if time.monotonic() + self._poll_interval > deadline:
                raise HetznerError(f"server {server_id} is still locked by a running action at the step's deadline")
            self._log(f"server {server_id} is locked by a running action; waiting")
            time.sleep(self._poll_interval)

    def _wait(self, what: str, action: BoundAction, deadline: float) -> None:
        while True:
            self._call(what, action.reload, deadline)
            if action.status == "success":
                return
            if action.status == "error":
                err = action.error
                reason = f"{err['code']}: {err['message']}" if err else "no reason given"
                raise HetznerError(f"{what}: action {action.id} failed: {reason}")
            if time.monotonic() + self._poll_interval > deadline:
                raise HetznerError(f"{what}: action {action.id} still running at the step's deadline")
            time.sleep(self._poll_interval)

    def _server_action(
        self,
        server_id: int,
        what: str,
        deadline: float,
        call: Callable[[], Any],
        *,
        repeatable: bool,
    ) -> int:
        """Run a server action to its end; returns the action's ID."""
        label = f"{what} on server {server_id}"
        action = self._call(label, call, deadline, repeatable=repeatable)
        # The library hands back either a BoundAction or a response object that carries one.
        bound = action if isinstance(action, BoundAction) else action.action
        self._wait(label, bound, deadline)
        return int(bound.id)

    def enable_rescue(self, server_id: int, ssh_key_ids: list[int], deadline: float) -> int:
        """Enable the linux64 rescue system with the given keys; the root password it returns is dropped."""
        servers = self._client.servers
        return self._server_action(
            server_id,
            "enable rescue",
            deadline,
            # The API takes key IDs (integers); the library's annotation says strings.
            lambda: servers.enable_rescue(Server(id=server_id), type="linux64", ssh_keys=ssh_key_ids),  # type: ignore[arg-type]
            repeatable=True,
        )

    def reset(self, server_id: int, deadline: float) -> int:
        return self._server_action(
            server_id, "reset", deadline, lambda: self._client.servers.reset(Server(id=server_id)), repeatable=False
        )

    def power_on(self, server_id: int, deadline: float) -> int:
        """Power the server on (a server that already runs is left as it is); returns the action's ID."""
        return self._server_action(
            server_id,
            "power on",
            deadline,
            lambda: self._client.servers.power_on(Server(id=server_id)),
            repeatable=True,
        )

    def restarted_since(self, server_id: int, action_id: int, deadline: float) -> bool:
        """Whether the server was restarted (reset, rebooted, powered off or on, ...) after action `action_id`."""
        server = Server(id=server_id)
        page = self._call(
            f"list actions of server {server_id}",
            lambda: self._client.servers.get_actions_list(server, sort=["id:desc"], per_page=50),
            deadline,
        )
        return any(a.id is not None and a.id > action_id and a.command in RESTART_COMMANDS for a in page.actions)

    def catalog(self, deadline: float) -> tuple[dict[str, set[str]], set[str]]:
        """The server types this project can use, each with the names of the locations that offer it (the
        per-location `locations` of a server type, Hetzner changelog 2025-09-24), and all location names."""
        types = self._call("list server types", self._client.server_types.get_all, deadline)
        locations = self._call("list locations", self._client.locations.get_all, deadline)
        offered = {
            t.name: {loc.location.name for loc in t.locations or [] if loc.location and loc.location.name}
            for t in types
            if t.name
        }
        return offered, {loc.name for loc in locations if loc.name}
