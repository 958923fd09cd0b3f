"""The machine side of a simulated server: its disk, and real OpenSSH endpoints (rescue, installed system).

A `Machine` is driven by the API's state machine: `boot_rescue` (rescue system with the disk at /dev/sda),
`boot_disk` (the installed system, through a boot hook), `halt`, `destroy`. SSH faults are read when a boot
starts; one-shot faults (`refuse_for_seconds`, `not_rescue`) are used up by that boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import asyncssh
from dabei_firstboot.config import HOST_KEY, ROOT_AUTHORIZED_KEYS
from dabei_firstboot.seed import SeedError, find_seed_partition, read_seed

from . import fake_rebuild
from .client import free_port
from .disk import Disk
from .fake_rebuild import ACTIVE_SYSTEM, CUT_SESSIONS, SIM_STATE, SSHD_STATE
from .firmware import NotBootable, check_bootable
from .sshd import FaultProxy, NamespacedProcess, PrivateDev, SshDaemon, SshdSettings
from .state import Durations
from .uplink import Uplink, UplinkProxy

log = logging.getLogger(__name__)

BootHook = Callable[["Machine"], Awaitable[None]]


@dataclass
class MachineSpec:
    server_id: int
    name: str
    ipv4: str | None  # None: an IPv6-only server
    ipv6_address: str | None
    mac: str
    disk_bytes: int
    state_dir: Path
    metadata_url: str
    # The server type's `architecture` (`x86` or `arm`): which boot loader the firmware runs.
    architecture: str = "x86"

    @property
    def address(self) -> str:
        """Where the machine's sshd listens: its public IPv4, or on an IPv6-only server its IPv6 address
        (placed on this machine's loopback device by `Machine.start`, so all traffic stays here)."""
        address = self.ipv4 or self.ipv6_address
        if address is None:
            raise ValueError(f"server {self.name} has neither a public IPv4 nor an IPv6 address")
        return address


def _loopback_ipv6(address: str, add: bool) -> None:
    """Add or remove an IPv6 address on `lo` (root; `nodad`: usable at once). An address another simulator
    already added stays (adding it again fails with "File exists"): addresses come from a random /48."""
    verb = "add" if add else "del"
    args = ["ip", "-6", "addr", verb, f"{address}/128", "dev", "lo", *(["nodad"] if add else [])]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if add and done.returncode != 0 and "File exists" not in done.stderr:
        raise RuntimeError(f"cannot put {address} on the loopback device: {done.stderr.strip()}")


@dataclass
class SshFaults:
    """SSH fault knobs of one machine (JSON names = field names; null or 0 switches a knob off)."""

    # After the next boot nothing listens for this long, then sshd starts (one-shot).
    refuse_for_seconds: float = 0.0
    # Each connection is cut after this many bytes from client to server.
    drop_after_bytes: int | None = None
    # The next rescue boot answers as a normal system: hostname = server name, no /dev/sda (one-shot).
    not_rescue: bool = False
    # After this many accepted connections of a boot, sshd is restarted with a new host key.
    change_host_key_after_connections: int | None = None
    # The installed system never comes up (no sshd after a disk boot).
    boot_hook_fails: bool = False
    # Each connection from another server (a relay) is cut after this many bytes from it.
    drop_relays_after_bytes: int | None = None

    def set_faults(self, changes: dict[str, Any]) -> None:
        """Apply the given knobs (others stay); ValueError names a bad key or value, and nothing changes."""
        if not isinstance(changes, dict):
            raise ValueError(f"ssh faults must be a JSON object, got {type(changes).__name__}")
        known = {f.name for f in fields(self)}
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown ssh fault {key!r}; known: {sorted(known)}")
            checked[key] = _check_fault(key, value)
        for key, value in checked.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fault(key: str, value: Any) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in ("not_rescue", "boot_hook_fails"):
        if not isinstance(value, bool):
            raise ValueError(f"ssh fault {key!r} must be true or false, got {value!r}")
        return value
    if key == "refuse_for_seconds":
        if value is None:
            return 0.0
        if not is_number or not 0 <= value <= 3600:
            raise ValueError(f"ssh fault {key!r} must be a number of seconds in [0, 3600], got {value!r}")
        return float(value)
    # drop_after_bytes, drop_relays_after_bytes, change_host_key_after_connections: a positive integer,
    # or null/0 for off
    if value is None or value == 0:
        return None
    if not is_number or int(value) != value or value < 0:
        raise ValueError(f"ssh fault {key!r} must be a positive integer or null, got {value!r}")
    return int(value)


def _new_host_key(path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))


class Machine:
    def __init__(self, spec: MachineSpec, *, ssh_port: int, boot_hook: BootHook | None = None) -> None:
        self.spec = spec
        self.ssh_port = ssh_port
        self.boot_hook: BootHook = boot_hook if boot_hook is not None else InstalledNixosHook()
        self.state_dir = spec.state_dir
        self.disk = Disk(spec.state_dir / "disk.img", spec.disk_bytes)
        self.faults = SshFaults()
        self.mode = "off"
        self.boot_id = ""
        # Why the last boot did not bring up SSH (boot hook failure, sshd failure), for describe().
        self.boot_error: str | None = None
        self._sshd: SshDaemon | None = None
        self._proxy: FaultProxy | None = None
        # The deployer's uplink, shared by all machines of the simulator (set by the project).
        self.uplink: Uplink | None = None
        self._uplink_proxy: UplinkProxy | None = None
        self._delayed_start: asyncio.Task[None] | None = None
        self._background: list[NamespacedProcess] = []
        # Tasks and servers of the installed system (the active-system follower, the HTTP endpoint).
        self._services: list[asyncio.Task[None] | asyncio.Server] = []
        self.app_port: int | None = None
        self._lock = asyncio.Lock()
        self._ipv6_on_lo = False

    @property
    def _listen_host(self) -> str:
        """The address as sshd's ListenAddress takes it (an IPv6 address in brackets)."""
        address = self.spec.address
        return f"[{address}]" if ":" in address else address

    # --- paths -------------------------------------------------------------------------------------------
    @property
    def disk_path(self) -> Path:
        return self.disk.path

    @property
    def rootfs(self) -> Path:
        """The installed system's root filesystem (what the first-boot program sees as `root`)."""
        return self.state_dir / "rootfs"

    @property
    def boot_id_path(self) -> Path:
        return self.state_dir / "boot_id"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def sshd_pid(self) -> int | None:
        return self._sshd.pid if self._sshd is not None else None

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def _ensure_address(self) -> None:
        if self.spec.ipv4 is None and not self._ipv6_on_lo:
            await asyncio.to_thread(_loopback_ipv6, self.spec.address, True)
            self._ipv6_on_lo = True

    async def boot_rescue(self, authorized_keys: list[str]) -> None:
        """Boot the rescue system: fresh host key, root by these keys, hostname `rescue`, disk at /dev/sda."""
        if not isinstance(authorized_keys, list):
            raise ValueError(
                f"authorized_keys must be a list of public key lines, got {type(authorized_keys).__name__}"
            )
        for index, key in enumerate(authorized_keys):
            if not isinstance(key, str) or not key.strip() or "\n" in key.strip():
                raise ValueError(f"authorized_keys[{index}] must be one non-empty public key line")
        async with self._lock:
            await self._halt()
            await self._ensure_address()
            self._new_boot("rescue")
            not_rescue, self.faults.not_rescue = self.faults.not_rescue, False
            rescue_dir = self.state_dir / "rescue"
            rescue_dir.mkdir(parents=True, exist_ok=True)
            host_key = rescue_dir / "ssh_host_ed25519_key"
            await asyncio.to_thread(_new_host_key, host_key)
            # Root's home is bound at /root in the rescue system, so its authorized_keys sits where Hetzner's
            # rescue has it (/root/.ssh/authorized_keys): a RAM system, changes vanish with the next boot.
            home = rescue_dir / "root"
            if home.exists():
                await asyncio.to_thread(shutil.rmtree, home)
            (home / ".ssh").mkdir(parents=True)
            keys_file = home / ".ssh/authorized_keys"
            keys_file.write_text("".join(k.strip() + "\n" for k in authorized_keys))
            # Outgoing SSH from the rescue system comes from the server's own address, as on Hetzner
            # (the uplink model tells server-to-server traffic from the deployer's by it).
            client_config = rescue_dir / "ssh_config"
            client_config.write_text(f"Host *\n    BindAddress {self.spec.address}\n")
            binds = [(home, "/root")]
            if Path("/etc/ssh/ssh_config").exists():
                binds.append((client_config, "/etc/ssh/ssh_config"))
            self.disk.ensure()
            try:
                private_dev = None
                if not not_rescue:
                    await self.disk.attach()
                    private_dev = PrivateDev(stage=rescue_dir / "dev", sda=self.disk.block_source)
                await self._start_ssh(
                    hostname=self.spec.name if not_rescue else "rescue",
                    host_key=host_key,
                    authorized_keys=".ssh/authorized_keys",
                    private_dev=private_dev,
                    # The rescue system's own home: the host's root dotfiles (shell start-up) stay out.
                    set_env={"HOME": "/root"},
                    binds=binds,
                )
            except BaseException:
                await self._halt()
                raise

    async def boot_disk(self) -> None:
        """Boot the installed system: a new boot id, then the boot hook (which may start sshd)."""
        async with self._lock:
            await self._halt()
            await self._ensure_address()
            self._new_boot("disk")
            self.disk.ensure()
            if self.faults.boot_hook_fails:
                self._boot_failed("boot hook fails (ssh fault boot_hook_fails)")
                return
            try:
                check_bootable(self.disk_path, self.spec.architecture)
            except NotBootable as e:
                # Like the hardware: the firmware finds nothing it can start, nothing comes up.
                self._boot_failed(str(e))
                return
            try:
                await self.boot_hook(self)
            except Exception as e:
                # A broken installed system is a state of the machine, not an error of the API call: it
                # stays "disk" with whatever the hook started (usually nothing), like a server that hangs.
                log.debug("boot hook of %s failed", self.spec.name, exc_info=True)
                self._boot_failed(f"boot hook failed: {e}")

    async def halt(self) -> None:
        """Stop every process of the machine and release its loop device."""
        async with self._lock:
            await self._halt()

    async def resize_disk(self, size: int) -> None:
        """Make the (halted) machine's disk `size` bytes, keeping its content."""
        async with self._lock:
            await self._halt()
            self.disk.grow(size)
            self.spec.disk_bytes = size

    async def destroy(self) -> None:
        """Halt and remove the disk and all state."""
        async with self._lock:
            await self._halt()
            self.disk.remove()
            await asyncio.to_thread(shutil.rmtree, self.state_dir, True)

    def set_faults(self, changes: dict[str, Any]) -> None:
        self.faults.set_faults(changes)

    def describe(self) -> dict[str, Any]:
        if self.disk.loop_device:
            backing = "loop"
        elif self.disk.fallback_reason:
            backing = f"plain file ({self.disk.fallback_reason})"
        else:
            backing = None
        return {
            "server_id": self.spec.server_id,
            "name": self.spec.name,
            "ipv4": self.spec.ipv4,
            "ipv6_address": self.spec.ipv6_address,
            "ssh_port": self.ssh_port,
            "mode": self.mode,
            "boot_id": self.boot_id,
            "state_dir": str(self.state_dir),
            "disk_path": str(self.disk_path),
            "disk_bytes": self.spec.disk_bytes,
            "loop_device": self.disk.loop_device,
            "disk_backing": backing,
            "rootfs": str(self.rootfs),
            "sshd_pid": self.sshd_pid,
            "ssh_proxy": self._proxy is not None,
            "uplink_proxy": self._uplink_proxy is not None,
            "metadata_url": self.spec.metadata_url,
            "architecture": self.spec.architecture,
            "faults": self.faults.to_dict(),
            "boot_error": self.boot_error,
            "app_port": self.app_port,
        }

    # --- for boot hooks ----------------------------------------------------------------------------------
    async def start_installed_sshd(
        self, *, hostname: str, host_key: Path, authorized_keys: Path, set_env: dict[str, str]
    ) -> None:
        """Start the installed system's sshd on `MachineSpec.address`:ssh_port (honouring the SSH faults)."""
        await self._start_ssh(
            hostname=hostname,
            host_key=host_key,
            authorized_keys=authorized_keys,
            private_dev=None,
            set_env=set_env,
        )

    async def spawn(self, name: str, argv: list[str], *, hostname: str, env: dict[str, str]) -> None:
        """Run a program of the installed system in the background until halt; output to log/NAME.log."""
        process = NamespacedProcess(
            argv, hostname=hostname, env=env, boot_id_file=self.boot_id_path, output=self.log_dir / f"{name}.log"
        )
        self._background.append(process)
        await process.start()

    async def follow_active_system(self, root: Path) -> None:
        """Apply what the active configuration says about sshd (`ACTIVE_SYSTEM`, written by the fake
        switch) until halt: root refused at login (`DenyUsers`, open sessions stay) or accepted again;
        each applied state is acknowledged in `SSHD_STATE`, which the switch waits for."""
        (root / SSHD_STATE).unlink(missing_ok=True)  # a fresh boot: sshd starts with the image's settings
        self._services.append(asyncio.create_task(self._follow(root)))

    async def _follow(self, root: Path) -> None:
        applied = "ok"
        while True:
            wanted = _active(root).get("ssh", "ok")
            if wanted != applied and self._sshd is not None and self._sshd.pid is not None:
                self._sshd.settings.deny_users = "root" if wanted == "refused" else None
                await self._sshd.reload()
                applied = wanted
                self.log_boot(f"sshd now {'refuses root' if wanted == 'refused' else 'accepts root'} (active system)")
                state = root / SSHD_STATE
                state.parent.mkdir(parents=True, exist_ok=True)
                state.write_text(applied + "\n")
            if (root / CUT_SESSIONS).exists():
                self._cut_sessions()
                (root / CUT_SESSIONS).unlink(missing_ok=True)
            await asyncio.sleep(0.1)

    def _cut_sessions(self) -> None:
        """Kill sshd's per-connection processes: every open SSH connection breaks off, what they started
        goes on (as when a switch restarts the network under them)."""
        pid = self._sshd.pid if self._sshd is not None else None
        if pid is None:
            return
        try:
            sessions = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return
        for child in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
        self.log_boot(f"cut {len(sessions)} SSH connection(s) (the active system's switch)")

    async def serve_app(self, root: Path, port: int) -> None:
        """The installed system's HTTP endpoint on the machine's address (an IPv6-only server's IPv6) and
        `port`: 200 while the active configuration is healthy, 503 when it says `health: failing` (a target
        for the deployer's HTTP and TCP probes)."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                healthy = _active(root).get("health", "ok") == "ok"
                body = b"ok\n" if healthy else b"unhealthy (simulated)\n"
                status = b"200 OK" if healthy else b"503 Service Unavailable"
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                writer.close()

        # Its own address only: an IPv6-only machine given no address would take the port on every one.
        server = await asyncio.start_server(answer, self.spec.address, port, reuse_address=True)
        self._services.append(server)
        self.app_port = port

    def log_boot(self, message: str) -> None:
        """One line in log/boot.log, the machine's console."""
        log.info("%s: %s", self.spec.name, message)
        with open(self.log_dir / "boot.log", "a") as f:
            f.write(f"[{self.boot_id}] {message}\n")

    # --- internals ---------------------------------------------------------------------------------------
    def _new_boot(self, mode: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.boot_error = None
        self.boot_id = str(uuid.uuid4())
        self.boot_id_path.write_text(self.boot_id + "\n")
        self.log_boot(f"booting ({mode})")

    def _boot_failed(self, reason: str) -> None:
        self.boot_error = reason
        self.log_boot(reason)

    async def _start_ssh(
        self,
        *,
        hostname: str,
        host_key: Path,
        authorized_keys: Path | str,
        private_dev: PrivateDev | None,
        set_env: dict[str, str],
        binds: list[tuple[Path, str]] | None = None,
    ) -> None:
        delay, self.faults.refuse_for_seconds = self.faults.refuse_for_seconds, 0.0
        drop_after = self.faults.drop_after_bytes
        rotate_after = self.faults.change_host_key_after_connections
        use_proxy = drop_after is not None or rotate_after is not None
        relay_drop = self.faults.drop_relays_after_bytes
        limited = self.uplink is not None and (self.uplink.bits_per_second is not None or relay_drop is not None)
        # Clients reach address:ssh_port; behind it, in this order: the uplink proxy, the fault proxy, sshd.
        public_port = self.ssh_port
        fault_port = free_port(self.spec.address) if limited and use_proxy else public_port
        sshd_port = free_port(self.spec.address) if limited or use_proxy else public_port
        settings = SshdSettings(
            listen_host=self._listen_host,
            listen_port=sshd_port,
            host_key=host_key,
            authorized_keys=authorized_keys,
            pid_file=self.state_dir / "sshd.pid",
            set_env=set_env,
        )
        self._sshd = SshDaemon(
            settings,
            config_path=self.state_dir / "sshd_config",
            log_path=self.log_dir / "sshd.log",
            hostname=hostname,
            private_dev=private_dev,
            boot_id_file=self.boot_id_path,
            binds=binds,
        )
        if use_proxy:

            async def before_connection(n: int) -> None:
                if rotate_after is not None and n == rotate_after + 1:
                    await self._rotate_host_key()

            self._proxy = FaultProxy(
                host=self.spec.address,
                port=fault_port,
                backend_port=sshd_port,
                drop_after_bytes=drop_after,
                before_connection=before_connection,
            )
        if limited:
            assert self.uplink is not None
            self._uplink_proxy = UplinkProxy(
                host=self.spec.address,
                port=public_port,
                backend_port=fault_port if use_proxy else sshd_port,
                uplink=self.uplink,
                drop_servers_after_bytes=relay_drop,
            )
        if delay > 0:
            self.log_boot(f"ssh refuses connections for {delay:g}s (ssh fault refuse_for_seconds)")
            self._delayed_start = asyncio.create_task(self._listen_after(delay))
        else:
            await self._listen()

    async def _listen(self) -> None:
        assert self._sshd is not None
        await self._sshd.start()
        if self._proxy is not None:
            await self._proxy.start()
        if self._uplink_proxy is not None:
            await self._uplink_proxy.start()
        self.log_boot(f"sshd listening on {self._listen_host}:{self.ssh_port} (pid {self._sshd.pid})")

    async def _listen_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._listen()
        except Exception as e:
            self._boot_failed(f"sshd did not start: {e}")

    async def _rotate_host_key(self) -> None:
        assert self._sshd is not None
        rotated = self.state_dir / "rotated_ssh_host_ed25519_key"
        await asyncio.to_thread(_new_host_key, rotated)
        self._sshd.settings.host_key = rotated
        await self._sshd.reload()
        self.log_boot("sshd restarted with a new host key (ssh fault change_host_key_after_connections)")

    async def _halt(self) -> None:
        if self._delayed_start is not None:
            self._delayed_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delayed_start
            self._delayed_start = None
        if self._uplink_proxy is not None:
            await self._uplink_proxy.stop()
            self._uplink_proxy = None
        if self._proxy is not None:
            await self._proxy.stop()
            self._proxy = None
        if self._sshd is not None:
            await self._sshd.stop()
            self._sshd = None
        for service in self._services:
            if isinstance(service, asyncio.Server):
                service.close()
            else:
                service.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await service
        self._services = []
        self.app_port = None
        for process in self._background:
            await process.stop()
        self._background = []
        await self.disk.detach()
        if self._ipv6_on_lo:  # a halted machine leaves nothing on this machine's network
            await asyncio.to_thread(_loopback_ipv6, self.spec.address, False)
            self._ipv6_on_lo = False
        if self.mode != "off":
            self.log_boot("halted")
        self.mode = "off"


@dataclass
class InstalledNixosHook:
    """The default boot hook: the installed NixOS, emulated with the real first-boot program (`nix-dabei`)
    working on `<state_dir>/rootfs`, against the simulated metadata service, with a fake rebuild."""

    metadata_retries: int = 10
    metadata_backoff_seconds: float = 0.2
    metadata_timeout_seconds: float = 5.0
    rebuild_retries: int = 3
    rebuild_backoff_seconds: float = 0.2
    # The simulator's durations; `rebuild` is how long each rebuild attempt takes (none: instant).
    durations: Durations | None = None
    # What each flake's configuration does (`/_sim/flakes`), read by the fake switch.
    behaviours: Path | None = None
    # The port of the installed system's HTTP endpoint (None: no endpoint).
    app_port: int | None = None

    async def __call__(self, machine: Machine) -> None:
        disk, root = machine.disk_path, machine.rootfs
        host_key = root / HOST_KEY
        has_seed_partition = _has_seed_partition(disk)
        if not has_seed_partition and not host_key.exists():
            raise RuntimeError("no bootable system on the disk (no dabei-seed partition, nothing installed)")
        if host_key.exists() and _has_fresh_seed(disk):
            # A fresh seed means a new image was written: the old root filesystem is gone with it.
            machine.log_boot("new image with a fresh seed: starting from an empty root filesystem")
            await asyncio.to_thread(_empty_rootfs, root)
        root.mkdir(parents=True, exist_ok=True)
        config_path = machine.state_dir / "nix-dabei.json"
        config_path.write_text(json.dumps(self.program_config(machine), indent=2) + "\n")
        bin_dir = machine.state_dir / "bin"
        _write_cli_wrapper(bin_dir / "nix-dabei", "dabei_firstboot")
        _write_cli_wrapper(bin_dir / "app-health", "dabei_component.sim.fake_rebuild", "health", "--root", str(root))
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "NIX_DABEI_CONFIG": str(config_path),
            "HOME": str(root / "root"),
            "LANG": "C.UTF-8",
        }
        await _run_logged(machine, ["nix-dabei", "seed"], env)
        # nix-dabei-grow.service, after the seed on every boot: the partition takes a disk that grew. Like
        # the unit, a failure is logged and the boot goes on (the system runs on the partition it has).
        with contextlib.suppress(RuntimeError):
            await _run_logged(machine, ["nix-dabei", "grow"], env)
        if not host_key.exists():
            raise RuntimeError(f"no host key at {host_key} after 'nix-dabei seed'")
        await machine.start_installed_sshd(
            hostname=machine.spec.name,
            host_key=host_key,
            authorized_keys=root / ROOT_AUTHORIZED_KEYS,
            set_env=env,
        )
        await machine.follow_active_system(root)
        if self.app_port is not None:
            await machine.serve_app(root, self.app_port)
        await machine.spawn("firstboot", ["nix-dabei", "firstboot"], hostname=machine.spec.name, env=env)

    def program_config(self, machine: Machine) -> dict[str, Any]:
        root = str(machine.rootfs)
        fake = [sys.executable, "-m", "dabei_component.sim.fake_rebuild"]
        return {
            "root": root,
            "metadata_url": machine.spec.metadata_url,
            "metadata_retries": self.metadata_retries,
            "metadata_backoff_seconds": self.metadata_backoff_seconds,
            "metadata_timeout_seconds": self.metadata_timeout_seconds,
            "seed_device": str(machine.disk_path),
            "boot_id_path": str(machine.boot_id_path),
            "rebuild_command": [
                sys.executable,
                "-m",
                "dabei_component.sim.fake_rebuild",
                "--root",
                root,
                "--flake",
                "{flake}",
                "--hostname",
                "{hostname}",
                "--seconds",
                str(self.durations.rebuild if self.durations is not None else 0.0),
                *(["--behaviours", str(self.behaviours)] if self.behaviours is not None else []),
            ],
            "switch_generation_command": [*fake, "switch-generation", "--root", root, "{generation}"],
            "activate_command": [*fake, "activate", "--root", root, "{system}"],
            "rebuild_retries": self.rebuild_retries,
            "rebuild_backoff_seconds": self.rebuild_backoff_seconds,
            "network_reload_command": None,
            # The host's own Nix store under its root, as the fake rebuild builds into it.
            "nix_store_command": ["nix-store", *fake_rebuild.host_store_args(machine.rootfs)],
        }


def _empty_rootfs(root: Path) -> None:
    """Remove the installed system, keeping the simulator's own records (rebuild log, failure counter)."""
    keep = root / SIM_STATE
    parked = root.with_name(root.name + ".sim-state")
    if keep.exists():
        os.replace(keep, parked)
    shutil.rmtree(root)
    if parked.exists():
        keep.parent.mkdir(parents=True)
        os.replace(parked, keep)


def _has_seed_partition(disk: Path) -> bool:
    try:
        find_seed_partition(disk)
    except SeedError:
        return False
    return True


def _has_fresh_seed(disk: Path) -> bool:
    try:
        read_seed(disk)
    except SeedError:
        return False
    return True


def _write_cli_wrapper(path: Path, module: str, *args: str) -> None:
    """A command for SSH sessions (`nix-dabei`: the real program), run with this simulator's interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", module, *args))
    path.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
    path.chmod(0o755)


def _active(root: Path) -> dict[str, Any]:
    """What the active configuration does (`ACTIVE_SYSTEM`); nothing written yet: all well."""
    try:
        value = json.loads((root / ACTIVE_SYSTEM).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


async def _run_logged(machine: Machine, argv: list[str], env: dict[str, str]) -> None:
    """Run a boot step to completion, its output into log/boot.log; raise if it fails."""
    machine.log_boot("running " + " ".join(argv))
    with open(machine.log_dir / "boot.log", "ab") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )
        code = await process.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with status {code} (see {machine.log_dir / 'boot.log'})")
