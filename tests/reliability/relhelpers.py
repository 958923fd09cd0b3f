"""Helpers of the reliability tests: an in-process simulator that records every API answer, stacks that
run `up` through the real provider server (and can kill it at a chosen moment), a larger test image.

The simulator runs on its own event loop thread in the test process, so every API response passes the
`response_observer` (requests and statuses are counted exactly) while the provider server stays a
separate process, as under `pulumi up`.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from hcloud import Client

from dabei_component.component import Deadlines, FleetArgs, HostArgs, ImageArgs
from dabei_component.demo import FIXTURE_FLAKE, fixture_image_attr
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.localup import DYNAMIC, HCLOUD_SERVER, LocalEngine, Recorded, generated_keys
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer
from dabei_component.sim import Simulator
from dabei_component.sim.app import ObservedResponse
from dabei_component.sim.client import ControlClient, free_port
from dabei_component.sim.threaded import SimulatorThread

# The larger test image: 64 MiB with this many incompressible bytes, so offsets in its stream matter.
PAYLOAD_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    method: str
    route: str | None
    path: str
    status: int


@dataclass
class ApiLog:
    """Every API answer of the simulator, in order; `root_passwords` from enable_rescue answers."""

    answers: list[Answer] = field(default_factory=list)
    root_passwords: list[str] = field(default_factory=list)
    # Called with each answer, on the simulator's thread.
    listeners: list[Callable[[Answer], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, obs: ObservedResponse) -> None:
        answer = Answer(obs.method, obs.route, obs.path, obs.status)
        with self._lock:
            self.answers.append(answer)
            if obs.path.endswith("/actions/enable_rescue") and obs.status < 300:
                password = json.loads(obs.body).get("root_password")
                if password:
                    self.root_passwords.append(password)
            listeners = list(self.listeners)
        for listener in listeners:
            listener(answer)

    def mark(self) -> int:
        with self._lock:
            return len(self.answers)

    def since(self, mark: int) -> list[Answer]:
        with self._lock:
            return self.answers[mark:]


class SimThread(SimulatorThread):
    """A Simulator on its own event loop thread that counts every API answer."""

    def __init__(self, state_dir: Path) -> None:
        self.api = ApiLog()
        super().__init__(Simulator(state_dir=state_dir, ssh_port=free_port(), response_observer=self.api.observe))

    @property
    def endpoint(self) -> str:
        return self.sim.endpoint

    @property
    def token(self) -> str:
        return self.sim.token

    @property
    def ssh_port(self) -> int:
        return self.sim.ssh_port

    def provider_config(self) -> dict[str, str]:
        return {"hcloud:token": self.token, "hcloud:endpoint": self.endpoint, "nix-dabei:sshPort": str(self.ssh_port)}

    # -- the control API (`/_sim/...`) -------------------------------------------------------------------

    @functools.cached_property
    def _control(self) -> ControlClient:
        return ControlClient(self.sim.control_url, self.token)

    def control(self, method: str, path: str, body: Any = None) -> Any:
        return self._control.request(method, path, body)

    def server(self, server_id: int | str) -> dict[str, Any]:
        return self._control.server(server_id)

    def set_api_faults(self, faults: dict[str, Any]) -> None:
        self._control.set_api_faults(faults)

    def set_ssh_faults(self, server_id: int | str, faults: dict[str, Any]) -> None:
        self._control.set_ssh_faults(server_id, faults)

    def ratelimit(self) -> dict[str, Any]:
        return self.control("GET", "/ratelimit")["ratelimit"]

    def boot_log(self, server_id: int | str) -> str:
        path = Path(self.server(server_id)["state_dir"]) / "log" / "boot.log"
        return path.read_text() if path.exists() else ""


def make_image_flake(directory: Path) -> Path:
    """A copy of the fixture image flake whose ZFS partition starts with PAYLOAD_BYTES of deterministic,
    incompressible bytes (the fixture's own payload compresses to almost nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "payload.bin").write_bytes(random.Random(6).randbytes(PAYLOAD_BYTES))
    flake = (FIXTURE_FLAKE / "flake.nix").read_text()
    flake = flake.replace("args = [ ./build.sh ];", "args = [ ./build.sh ];\n        payloadFile = ./payload.bin;")
    assert "payloadFile" in flake, "the fixture flake changed: adapt make_image_flake"
    (directory / "flake.nix").write_text(flake)
    (directory / "flake.lock").write_text((FIXTURE_FLAKE / "flake.lock").read_text())
    build = (FIXTURE_FLAKE / "build.sh").read_text()
    build += 'dd if="$payloadFile" of="$img" bs=512 seek="$(start 4)" conv=notrunc status=none\n'
    (directory / "build.sh").write_text(build)
    return directory


def fleet_args(
    prefix: str,
    count: int = 1,
    *,
    image_flake: Path = FIXTURE_FLAKE,
    flake: str = "github:example/infra",
    deadlines: Deadlines | None = None,
    ssh_port: int,
) -> FleetArgs:
    return FleetArgs(
        hosts=[
            HostArgs(name=f"{prefix}-{i}", server_type="cx22", location=("fsn1", "nbg1", "hel1")[i % 3], flake=flake)
            for i in range(1, count + 1)
        ],
        image=ImageArgs(flake=f"path:{image_flake}", attr=fixture_image_attr(), nix_args=list(OFFLINE_NIX_ARGS)),
        deadlines=deadlines or Deadlines(rescue=120, install=180, firstboot=120),
        ssh_port=ssh_port,
    )


class KillSwitch:
    """Kills the provider server (SIGKILL, as a crash would) at the first output line that matches
    `pattern`, or when `fire()` is called. Stands in for the server's echo stream to see its output."""

    def __init__(self, pattern: str | None = None) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.server: ProviderServer | None = None
        self.fired = threading.Event()
        self._buffer = ""
        self._lock = threading.Lock()

    def fire(self) -> None:
        with self._lock:
            if self.fired.is_set() or self.server is None:
                return
            self.fired.set()
            self.server.kill()

    def write(self, text: str) -> int:
        self._buffer += text
        if self.pattern is not None and self.pattern.search(self._buffer):
            self.fire()
        return len(text)

    def flush(self) -> None:
        pass


class Stack:
    """One stack: its recorded state survives provider servers; `up` runs the real program."""

    def __init__(self, sim: SimThread, work: Path, cache: Path, name: str) -> None:
        self.sim = sim
        self.work = work
        self.cache = cache
        self.name = name
        self.state: dict[str, Recorded] = {}
        self.operations: dict[str, str] = {}
        self.logs: list[Path] = []
        self.runs = 0

    def provider(self, switch: KillSwitch | None = None) -> ProviderServer:
        self.runs += 1
        log = self.work / f"provider-{self.runs}.log"
        self.logs.append(log)
        server = ProviderServer(
            project="nix-dabei",
            log_path=log,
            env={"XDG_CACHE_HOME": str(self.cache)},
            echo=cast("IO[str] | None", switch),  # it only needs write() and flush()
        )
        if switch is not None:
            switch.server = server
        server.configure(self.sim.provider_config())
        return server

    def engine(self, server: ProviderServer) -> LocalEngine:
        client = Client(token=self.sim.token, api_endpoint=self.sim.endpoint, poll_interval=0.2)
        return LocalEngine(server=server, hcloud=client, state=self.state)

    def up(
        self, args: FleetArgs, *, kill: KillSwitch | None = None, before: Callable[[LocalEngine], None] | None = None
    ) -> dict[str, Any]:
        """Run `up` with a new provider server (which `kill` may kill on the way)."""
        server = self.provider(kill)
        try:
            engine = self.engine(server)
            if before is not None:
                before(engine)
            try:
                return engine.up(lambda: declare(args, name=self.name))
            finally:
                self.operations = dict(engine.operations)
                if kill is not None:
                    assert kill.fired.is_set(), "the kill switch never fired"
        finally:
            server.close()

    def outputs(self, step: str) -> dict[str, Any]:
        return self.state[f"{DYNAMIC}::{self.name}-{step}"].outputs

    def keys(self) -> dict[str, Any]:
        return generated_keys(self.state, self.name)

    def hosts(self, step: str) -> dict[str, Any]:
        return self.outputs(step)["hosts"]

    def log_text(self, run: int = -1) -> str:
        return self.logs[run].read_text()

    def all_logs(self) -> str:
        return "".join(log.read_text() for log in self.logs)


def when_created(engine: LocalEngine, kind: str, fn: Callable[[str, dict[str, Any]], None]) -> None:
    """Call `fn(id, outputs)` right after the engine created or updated a resource of `kind`: `server`
    (an hcloud server) or a step name (`rescue`, `install`, ...), before anything that depends on it runs."""

    def listener(key: str, rec: Recorded, _op: str) -> None:
        typ, name = key.split("::", 1)
        if (kind == "server" and typ == HCLOUD_SERVER) or (typ == DYNAMIC and name.endswith(f"-{kind}")):
            fn(rec.id, rec.outputs)

    engine.listeners.append(listener)


def disk_untouched(sim: SimThread, server_id: int | str) -> bool:
    """Nothing was ever written to the server's disk (its sparse file has no data blocks)."""
    return Path(sim.server(server_id)["machine"]["disk_path"]).stat().st_blocks == 0
