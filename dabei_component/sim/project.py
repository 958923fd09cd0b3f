"""The state of one simulated Hetzner Cloud project: resources, actions that run over time, machines."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from .errors import ApiError, locked
from .faults import Faults
from .ratelimit import RateLimiter
from .state import (
    CATALOG_CREATED,
    SYSTEM_IMAGES,
    Action,
    AddressPool,
    Durations,
    Image,
    Server,
    SshKey,
)
from .uplink import Uplink

log = logging.getLogger(__name__)

PROJECT: web.AppKey[Project] = web.AppKey("project")


class MachineLike(Protocol):
    """What the simulator needs of `machine.Machine` (real sshd processes and a loop disk)."""

    mode: str

    async def boot_rescue(self, authorized_keys: list[str]) -> None: ...
    async def boot_disk(self) -> None: ...
    async def resize_disk(self, size: int) -> None: ...
    async def halt(self) -> None: ...
    async def destroy(self) -> None: ...
    def set_faults(self, faults: dict[str, Any]) -> None: ...
    def describe(self) -> dict[str, Any]: ...


# Builds a machine from the MachineSpec fields (a dict, so stand-ins need not import machine.py).
MachineFactory = Callable[[dict[str, Any], int, Any], MachineLike]


def real_machine(spec: dict[str, Any], ssh_port: int, boot_hook: Any) -> MachineLike:
    from .machine import Machine, MachineSpec

    machine: MachineLike = Machine(MachineSpec(**spec), ssh_port=ssh_port, boot_hook=boot_hook)
    return machine


def service_port() -> int:
    """A port for a service every machine listens on (the installed system's HTTP endpoint), below the
    kernel's ephemeral range: `free_port` answers from that range, so a port it picks later for one
    machine's address can never be this one."""
    start = random.randrange(20000, 32000)
    for port in [*range(start, 32000), *range(20000, start)]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def default_boot_hook(durations: Durations, behaviours: Path | None = None, app_port: int | None = None) -> Any:
    """The installed NixOS emulation, its rebuild taking `durations.rebuild` (read at each boot); what each
    flake's configuration does comes from the `behaviours` file (`/_sim/flakes`); its HTTP endpoint listens
    on `app_port` (None: none)."""
    from .machine import InstalledNixosHook

    return InstalledNixosHook(durations=durations, behaviours=behaviours, app_port=app_port)


Work = Callable[[], Awaitable[None]]


class Project:
    def __init__(
        self,
        *,
        state_dir: Path,
        ssh_port: int,
        durations: Durations,
        boot_hook: Any,
        machine_factory: MachineFactory,
    ) -> None:
        self.state_dir = state_dir
        self.ssh_port = ssh_port
        self.durations = durations
        self.boot_hook = boot_hook
        self.machine_factory = machine_factory
        self.metadata_base = ""  # "http://HOST:PORT/_metadata", known once the listener is bound
        # The port of every installed host's HTTP endpoint (each host listens on its own address).
        self.app_port = service_port()
        self.faults = Faults()
        self.ratelimit = RateLimiter()
        # Servers relay over IPv4 only: a connection to an IPv6-only server's address on `lo` comes from that
        # same address, so only IPv4 sources tell a server from the deployer.
        self.uplink = Uplink(lambda: {server.ipv4 for server in self.servers.values() if server.ipv4})
        self.addresses = AddressPool()
        self.servers: dict[int, Server] = {}
        self.ssh_keys: dict[int, SshKey] = {}
        self.images: dict[int, Image] = {
            spec["id"]: Image(type="system", disk_size=5, image_size=None, created=CATALOG_CREATED, **spec)
            for spec in SYSTEM_IMAGES
        }
        self.actions: dict[int, Action] = {}
        # Resources of the modules that keep their own stores (networks, placement groups, primary IPs).
        self.extra: dict[str, Any] = {}
        self.machines: dict[int, MachineLike] = {}
        self._server_tasks: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server_ids = itertools.count(4_711_001)
        self._action_ids = itertools.count(90_000_001)
        self._ssh_key_ids = itertools.count(3_001)
        self._image_ids = itertools.count(200_000_001)

    @property
    def flake_behaviours_path(self) -> Path:
        """What each flake's configuration does once a simulated host switched to it (`/_sim/flakes`)."""
        return self.state_dir / "flake-behaviours.json"

    # --- ids and lookups ------------------------------------------------------------------------

    def next_server_id(self) -> int:
        return next(self._server_ids)

    def next_ssh_key_id(self) -> int:
        return next(self._ssh_key_ids)

    def next_image_id(self) -> int:
        return next(self._image_ids)

    def server(self, server_id: int) -> Server:
        server = self.servers.get(server_id)
        if server is None:
            raise ApiError("not_found", f"server with ID {server_id} not found")
        return server

    def metadata_url(self, server_id: int) -> str:
        return f"{self.metadata_base}/{server_id}/hetzner/v1/metadata"

    # --- actions --------------------------------------------------------------------------------

    def new_action(self, command: str, resources: list[dict[str, Any]], duration: float) -> Action:
        action = Action(id=next(self._action_ids), command=command, resources=resources, duration=duration)
        self.actions[action.id] = action
        return action

    def server_action(self, server: Server, command: str, duration: float) -> Action:
        resources = [{"id": server.id, "type": "server"}]
        return self.new_action(command, resources, duration)

    def run_on_server(
        self, server: Server, steps: list[tuple[Action, Work]], on_failure: Callable[[], None] | None = None
    ) -> None:
        """Run actions one after another on a server, which stays locked until the last one ends.

        Raises `locked` if another action is still running on it; `on_failure` runs if one fails."""
        if server.locked:
            raise locked(server.id)
        server.current_action = steps[0][0]
        task = asyncio.get_running_loop().create_task(self._run_steps(server, steps, on_failure))
        self._server_tasks[server.id] = task
        self._track(task)

    def run_detached(self, action: Action, work: Work) -> None:
        async def run() -> None:
            await self._run_one(action, work)

        self._track(asyncio.get_running_loop().create_task(run()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_steps(
        self, server: Server, steps: list[tuple[Action, Work]], on_failure: Callable[[], None] | None
    ) -> None:
        for index, (action, work) in enumerate(steps):
            server.current_action = action
            if not await self._run_one(action, work):
                for later, _ in steps[index + 1 :]:
                    later.fail("action_failed", f"not run: {action.command} failed")
                if on_failure is not None:
                    on_failure()
                break

    async def _run_one(self, action: Action, work: Work) -> bool:
        """Run the action: wait its duration (plus any injected delay), then do its work."""
        try:
            delay = action.duration + self.faults.take_action_delay(action.command)
            action.duration = delay
            await asyncio.sleep(delay)
            failure = self.faults.take_action_failure(action.command)
            if failure is not None:
                action.fail(failure.code, failure.message)
                return False
            await work()
        except asyncio.CancelledError:
            action.fail("action_failed", "simulator stopped")
            raise
        except Exception as exc:  # any failure of the work is the action's error, not the server's
            log.warning("action %s (%s) failed: %s", action.id, action.command, exc)
            action.fail("action_failed", f"{action.command} failed: {exc}")
            return False
        action.succeed()
        return True

    async def wait_idle(self, server_id: int) -> None:
        task = self._server_tasks.get(server_id)
        if task is not None and not task.done():
            await asyncio.wait([task])

    # --- machine life cycle ---------------------------------------------------------------------

    def create_machine(self, server: Server) -> MachineLike:
        spec = {
            "server_id": server.id,
            "name": server.name,
            "ipv4": server.ipv4,
            "ipv6_address": server.ipv6_address,
            "mac": server.mac,
            "disk_bytes": int(server.server_type["disk"]) * 1024**3,
            "state_dir": self.state_dir / "servers" / str(server.id),
            "metadata_url": self.metadata_url(server.id),
            "architecture": server.server_type["architecture"],
        }
        boot_hook = self.boot_hook
        if boot_hook is None:
            boot_hook = default_boot_hook(self.durations, self.flake_behaviours_path, self.app_port)
        machine = self.machine_factory(spec, self.ssh_port, boot_hook)
        if hasattr(machine, "uplink"):
            machine.uplink = self.uplink
        self.machines[server.id] = machine
        return machine

    async def boot(self, server: Server) -> None:
        """Boot into rescue if it is enabled (which consumes it), else from the disk."""
        machine = self.machines[server.id]
        server.status = "starting"
        server.expire_rescue(time.time())
        try:
            if server.rescue_enabled:
                keys = list(server.rescue_keys)
                server.disable_rescue()
                await machine.boot_rescue(keys)
            else:
                await machine.boot_disk()
        except BaseException:
            await machine.halt()
            server.status = "off"
            raise
        server.status = "running"

    async def halt(self, server: Server, *, graceful: bool) -> None:
        if graceful:
            server.status = "stopping"
        await self.machines[server.id].halt()
        server.status = "off"

    async def destroy(self, server: Server) -> None:
        await self.wait_idle(server.id)
        machine = self.machines.get(server.id)
        if machine is not None:
            await machine.destroy()
            del self.machines[server.id]
        if server.ipv4 is not None and server.ipv4_id is None:
            self.addresses.release(server.ipv4)
        self._server_tasks.pop(server.id, None)

    async def stop(self) -> None:
        """Cancel running actions and halt every machine (in parallel)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        results = await asyncio.gather(*(m.halt() for m in self.machines.values()), return_exceptions=True)
        for server_id, result in zip(list(self.machines), results, strict=True):
            if isinstance(result, BaseException):
                log.error("halting machine of server %s failed: %s", server_id, result)
