"""Domain objects of the simulated project and their JSON form (the shapes of the OpenAPI schemas)."""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import invalid_input


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass
class Durations:
    """How long each action runs, in seconds (small defaults so tests run fast)."""

    create: float = 0.2
    boot: float = 0.1
    shutdown: float = 0.1
    poweroff: float = 0.05
    reboot: float = 0.1
    reset: float = 0.1
    rescue_enable: float = 0.05
    rescue_disable: float = 0.05
    create_image: float = 0.2
    change_type: float = 0.2
    delete: float = 0.1
    rescue_expiry: float = 3600.0
    # How long the installed system's `nixos-rebuild switch` (the fake one) takes, per attempt.
    rebuild: float = 0.0

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def update(self, values: object) -> None:
        """Apply a partial JSON update; every key must name a duration and be a non-negative number."""
        if not isinstance(values, dict):
            raise invalid_input({"durations": ["must be an object of name: seconds"]})
        names = {f.name for f in dataclasses.fields(self)}
        problems: dict[str, list[str]] = {}
        for key, value in values.items():
            if key not in names:
                problems[key] = [f"unknown duration; known: {sorted(names)}"]
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                problems[key] = ["must be a non-negative number of seconds"]
        if problems:
            raise invalid_input(problems)
        for key, value in values.items():
            setattr(self, key, float(value))


# --- static catalog -------------------------------------------------------------------------------

LOCATIONS: list[dict[str, Any]] = [
    {"id": 1, "name": "fsn1", "description": "Falkenstein DC Park 1", "country": "DE", "city": "Falkenstein",
     "latitude": 50.47612, "longitude": 12.370071, "network_zone": "eu-central", "dc": "fsn1-dc14"},
    {"id": 2, "name": "nbg1", "description": "Nuremberg DC Park 1", "country": "DE", "city": "Nuremberg",
     "latitude": 49.452102, "longitude": 11.076665, "network_zone": "eu-central", "dc": "nbg1-dc3"},
    {"id": 3, "name": "hel1", "description": "Helsinki DC Park 1", "country": "FI", "city": "Helsinki",
     "latitude": 60.169855, "longitude": 24.938379, "network_zone": "eu-central", "dc": "hel1-dc2"},
    {"id": 4, "name": "ash", "description": "Ashburn, VA", "country": "US", "city": "Ashburn, VA",
     "latitude": 39.045821, "longitude": -77.487073, "network_zone": "us-east", "dc": "ash-dc1"},
    {"id": 5, "name": "hil", "description": "Hillsboro, OR", "country": "US", "city": "Hillsboro, OR",
     "latitude": 45.54222, "longitude": -122.951924, "network_zone": "us-west", "dc": "hil-dc1"},
    {"id": 6, "name": "sin", "description": "Singapore", "country": "SG", "city": "Singapore",
     "latitude": 1.283333, "longitude": 103.833333, "network_zone": "ap-southeast", "dc": "sin-dc1"},
]  # fmt: skip

# Where each type is offered (Hetzner's docs, "Server types": the shared x86 CX and the Arm64 CAX types
# in the EU locations only; CPX and the dedicated CCX types everywhere). Creating a server of a type in
# another location fails with `invalid_input` "unsupported location for server type".
_EU = ("fsn1", "nbg1", "hel1")
_ALL = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")

SERVER_TYPES: list[dict[str, Any]] = [
    {"id": 22, "name": "cx22", "description": "CX22", "cores": 2, "memory": 4.0, "disk": 40,
     "cpu_type": "shared", "architecture": "x86", "category": "cost_optimized", "hourly": "0.0060",
     "locations": _EU},
    {"id": 25, "name": "cx32", "description": "CX32", "cores": 4, "memory": 8.0, "disk": 80,
     "cpu_type": "shared", "architecture": "x86", "category": "cost_optimized", "hourly": "0.0110",
     "locations": _EU},
    {"id": 1, "name": "cpx11", "description": "CPX 11", "cores": 2, "memory": 2.0, "disk": 40,
     "cpu_type": "shared", "architecture": "x86", "category": "regular_purpose", "hourly": "0.0070",
     "locations": _ALL},
    {"id": 3, "name": "cpx21", "description": "CPX 21", "cores": 3, "memory": 4.0, "disk": 80,
     "cpu_type": "shared", "architecture": "x86", "category": "regular_purpose", "hourly": "0.0130",
     "locations": _ALL},
    {"id": 45, "name": "cax11", "description": "CAX11", "cores": 2, "memory": 4.0, "disk": 40,
     "cpu_type": "shared", "architecture": "arm", "category": "cost_optimized", "hourly": "0.0060",
     "locations": _EU},
    {"id": 96, "name": "ccx13", "description": "CCX13 Dedicated CPU", "cores": 2, "memory": 8.0, "disk": 80,
     "cpu_type": "dedicated", "architecture": "x86", "category": "general_purpose", "hourly": "0.0200",
     "locations": _ALL},
]  # fmt: skip

SYSTEM_IMAGES: list[dict[str, Any]] = [
    {"id": 114690387, "name": "debian-12", "description": "Debian 12", "os_flavor": "debian",
     "os_version": "12", "architecture": "x86"},
    {"id": 114690389, "name": "debian-12", "description": "Debian 12", "os_flavor": "debian",
     "os_version": "12", "architecture": "arm"},
    {"id": 161547269, "name": "ubuntu-24.04", "description": "Ubuntu 24.04", "os_flavor": "ubuntu",
     "os_version": "24.04", "architecture": "x86"},
    {"id": 161547270, "name": "ubuntu-24.04", "description": "Ubuntu 24.04", "os_flavor": "ubuntu",
     "os_version": "24.04", "architecture": "arm"},
]  # fmt: skip

CATALOG_CREATED = 1686636000.0  # when the system images were published


def location_json(loc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in loc.items() if k != "dc"}


def offered(server_type: dict[str, Any], location: dict[str, Any]) -> bool:
    """Whether the server type can be created in the location."""
    return bool(location["name"] in server_type["locations"])


def datacenter_json(loc: dict[str, Any]) -> dict[str, Any]:
    type_ids = [st["id"] for st in SERVER_TYPES if offered(st, loc)]
    return {
        "id": loc["id"],
        "name": loc["dc"],
        "description": f"{loc['city']} DC {loc['dc'].rsplit('dc', 1)[-1]}",
        "location": location_json(loc),
        "server_types": {"available": type_ids, "available_for_migration": type_ids, "supported": type_ids},
    }


def server_type_json(st: dict[str, Any]) -> dict[str, Any]:
    def price(amount: str) -> dict[str, str]:
        return {"net": amount, "gross": f"{float(amount) * 1.19:.4f}"}

    monthly = f"{float(st['hourly']) * 730:.4f}"
    return {
        "id": st["id"],
        "name": st["name"],
        "description": st["description"],
        "category": st["category"],
        "cores": st["cores"],
        "memory": st["memory"],
        "disk": st["disk"],
        "deprecated": False,
        "deprecation": None,
        "prices": [
            {
                "location": loc["name"],
                "price_hourly": price(st["hourly"]),
                "price_monthly": price(monthly),
                "included_traffic": 21990232555520,
                "price_per_tb_traffic": price("1.0000"),
            }
            for loc in LOCATIONS
            if offered(st, loc)
        ],
        "storage_type": "local",
        "cpu_type": st["cpu_type"],
        "architecture": st["architecture"],
        # `available`, `recommended`: newer than the bundled spec, required by hcloud-python 2.27.
        "locations": [
            {"id": loc["id"], "name": loc["name"], "deprecation": None, "available": True, "recommended": True}
            for loc in LOCATIONS
            if offered(st, loc)
        ],
    }


# --- mutable resources ----------------------------------------------------------------------------


@dataclass
class SshKey:
    id: int
    name: str
    public_key: str
    fingerprint: str
    labels: dict[str, str]
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "labels": self.labels,
            "created": iso(self.created),
        }


@dataclass
class Image:
    id: int
    type: str  # system | snapshot | backup
    name: str | None
    description: str
    os_flavor: str
    os_version: str | None
    architecture: str
    disk_size: float
    labels: dict[str, str] = field(default_factory=dict)
    status: str = "available"
    image_size: float | None = None
    created_from: dict[str, Any] | None = None
    bound_to: int | None = None
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "name": self.name,
            "description": self.description,
            "image_size": self.image_size,
            "disk_size": self.disk_size,
            "created": iso(self.created),
            "created_from": self.created_from,
            "bound_to": self.bound_to,
            "os_flavor": self.os_flavor,
            "os_version": self.os_version,
            "rapid_deploy": self.type == "system",
            "protection": {"delete": False},
            "deprecated": None,
            "deleted": None,
            "labels": self.labels,
            "architecture": self.architecture,
        }


@dataclass
class Action:
    id: int
    command: str
    resources: list[dict[str, Any]]
    duration: float
    status: str = "running"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: dict[str, str] | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    def progress(self) -> int:
        if self.status == "success":
            return 100
        if self.status == "error":
            return 0 if self.finished is None else self._elapsed_progress(self.finished)
        return self._elapsed_progress(time.time())

    def _elapsed_progress(self, now: float) -> int:
        if self.duration <= 0:
            return 99
        return min(99, int((now - self.started) / self.duration * 100))

    def succeed(self) -> None:
        self.status, self.finished = "success", time.time()

    def fail(self, code: str, message: str) -> None:
        self.status, self.finished = "error", time.time()
        self.error = {"code": code, "message": message}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": self.progress(),
            "started": iso(self.started),
            "finished": iso(self.finished),
            "resources": self.resources,
            "error": self.error,
        }


@dataclass
class Server:
    id: int
    name: str
    server_type: dict[str, Any]
    location: dict[str, Any]
    image: Image
    ssh_key_ids: list[int]
    labels: dict[str, str]
    ipv4: str | None  # None: public IPv4 off
    ipv6_net: str | None  # "2001:db8:N::/64"; None: public IPv6 off
    mac: str
    user_data: str | None
    ipv4_id: int | None = None  # the primary IP (a project one, or the server's own when None)
    ipv6_id: int | None = None
    private_net: list[dict[str, Any]] = field(default_factory=list)
    placement_group_id: int | None = None
    placement_group_json: Any = None  # () -> the placement group object, or None
    protection: dict[str, bool] = field(default_factory=lambda: {"delete": False, "rebuild": False})
    backup_window: str | None = None
    status: str = "initializing"
    rescue_enabled: bool = False
    rescue_keys: list[str] = field(default_factory=list)
    rescue_expires: float | None = None
    current_action: Action | None = None
    created: float = field(default_factory=time.time)

    @property
    def locked(self) -> bool:
        return self.current_action is not None and self.current_action.running

    @property
    def ipv6_address(self) -> str | None:
        return None if self.ipv6_net is None else self.ipv6_net.split("/")[0] + "1"

    def expire_rescue(self, now: float) -> None:
        """Rescue auto-disables after its expiry, like Hetzner's (checked lazily, on every read)."""
        if self.rescue_enabled and self.rescue_expires is not None and now >= self.rescue_expires:
            self.disable_rescue()

    def disable_rescue(self) -> None:
        self.rescue_enabled, self.rescue_keys, self.rescue_expires = False, [], None

    def to_json(self) -> dict[str, Any]:
        self.expire_rescue(time.time())
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "created": iso(self.created),
            "public_net": {
                "ipv4": None
                if self.ipv4 is None
                else {
                    "id": self.ipv4_id or self.id + 40_000_000,
                    "ip": self.ipv4,
                    "blocked": False,
                    "dns_ptr": f"static.{self.ipv4}.clients.your-server.de",
                },
                "ipv6": None
                if self.ipv6_net is None
                else {"id": self.ipv6_id or self.id + 50_000_000, "ip": self.ipv6_net, "blocked": False, "dns_ptr": []},
                "floating_ips": [],
                "firewalls": [],
            },
            "private_net": [dict(n) for n in self.private_net],
            "server_type": server_type_json(self.server_type),
            "datacenter": datacenter_json(self.location),
            "location": location_json(self.location),
            "image": self.image.to_json(),
            "iso": None,
            "rescue_enabled": self.rescue_enabled,
            "locked": self.locked,
            "backup_window": self.backup_window,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "protection": dict(self.protection),
            "labels": self.labels,
            "volumes": [],
            "load_balancers": [],
            "primary_disk_size": self.server_type["disk"],
            "placement_group": self.placement_group_json() if self.placement_group_json else None,
        }


class AddressPool:
    """Unique public addresses: IPv4 127.77.X.Y (never .0 or .255), IPv6 /64s from a random /48 of 2001:db8::/32."""

    def __init__(self) -> None:
        self._ipv4_in_use: set[str] = set()
        self._next = 1
        # IPv6-only servers' addresses go on this machine's loopback device, shared by every simulator
        # running here: each simulator takes its /64s from its own random /48.
        self._site = secrets.randbelow(0xFFFF) + 1

    def allocate(self) -> tuple[str, str, str]:
        for _ in range(256 * 256):
            n = self._next
            self._next = self._next + 1 if self._next < 256 * 256 - 1 else 1
            high, low = divmod(n, 256)
            ipv4 = f"127.77.{high}.{low}"
            if low in (0, 255) or ipv4 in self._ipv4_in_use:
                continue
            self._ipv4_in_use.add(ipv4)
            mac = f"96:00:00:77:{high:02x}:{low:02x}"
            return ipv4, f"2001:db8:{self._site:x}:{n:x}::/64", mac
        raise RuntimeError("no free simulated IPv4 address left in 127.77.0.0/16")

    def release(self, ipv4: str) -> None:
        self._ipv4_in_use.discard(ipv4)
