"""`Simulator`: a stateful local Hetzner Cloud (API, metadata service, real SSH machines) in one process."""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import Observer, build_app
from .project import MachineFactory, Project, real_machine
from .state import Durations

log = logging.getLogger(__name__)


class Simulator:
    """Start with `await start()`; talk to `endpoint` with `token`; `await stop()` releases everything.

    `state_dir` holds the machines' disks and state; without one a temporary directory is made and removed
    on stop. `machine_factory` replaces the real machines (sshd processes and loop disks)."""

    def __init__(
        self,
        state_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssh_port: int = 22,
        durations: Durations | None = None,
        boot_hook: Any = None,
        *,
        response_observer: Observer | None = None,
        machine_factory: MachineFactory = real_machine,
    ) -> None:
        self._state_dir_arg = state_dir
        self._host = host
        self._port = port
        self.ssh_port = ssh_port
        self.durations = durations or Durations()
        self._boot_hook = boot_hook
        self._observer = response_observer
        self._machine_factory = machine_factory
        self._token = secrets.token_hex(32)
        self._runner: web.AppRunner | None = None
        self._temp_dir: Path | None = None
        self._base_url = ""
        self.project: Project | None = None

    @property
    def token(self) -> str:
        return self._token

    @property
    def endpoint(self) -> str:
        return f"{self._require_started()}/v1"

    @property
    def control_url(self) -> str:
        return f"{self._require_started()}/_sim"

    @property
    def state_dir(self) -> Path:
        self._require_started()
        assert self.project is not None
        return self.project.state_dir

    def _require_started(self) -> str:
        if not self._base_url:
            raise RuntimeError("the simulator is not started")
        return self._base_url

    async def start(self) -> None:
        if self._state_dir_arg is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="dabei-sim-"))
            state_dir = self._temp_dir
        else:
            state_dir = self._state_dir_arg
            state_dir.mkdir(parents=True, exist_ok=True)
        self.project = Project(
            state_dir=state_dir,
            ssh_port=self.ssh_port,
            durations=self.durations,
            boot_hook=self._boot_hook,
            machine_factory=self._machine_factory,
        )
        app = build_app(self.project, self._token, self._observer)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # Bind the socket ourselves so that port 0 resolves to a known port before anyone can connect.
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        port = sock.getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._base_url = f"http://{host}:{port}"
        self.project.metadata_base = f"{self._base_url}/_metadata"
        log.info("simulator listening on %s", self._base_url)

    async def stop(self) -> None:
        """Halt every machine, close the listener, remove the state directory if it was made here."""
        try:
            if self.project is not None:
                await self.project.stop()
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
                self._temp_dir = None
            self._base_url = ""

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
