"""Processes of a simulated server: real OpenSSH sshd and helpers in their own namespaces; a fault proxy.

Every process runs as the init of its own PID namespace (plus UTS and private mount namespaces), so killing
it kills everything it started, sessions included, like a server that is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
# sshd refuses to start without its privilege separation directory; Debian creates it only from systemd.
PRIVSEP_DIR = Path("/run/sshd")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")

# Runs inside the new namespaces: $1 hostname, $2 staging dir for a private /dev ("" keeps the host's),
# $3 what to bind at /dev/sda, $4 a file to show as the kernel's boot id ("" keeps the host's), $5 a
# file of "SOURCE TARGET" lines to bind-mount ("" for none; paths without spaces), then the program.
# The tmpfs is built at the staging dir and moved over /dev, so the host's /dev is never touched
# (the mount namespace is private).
_NAMESPACE_INIT = r"""
set -eu
hostname "$1"
if [ -n "$2" ]; then
  S=$2
  mount -t tmpfs -o mode=755,size=1m sim-dev "$S"
  for n in NODES; do : > "$S/$n"; mount --bind "/dev/$n" "$S/$n"; done
  mkdir "$S/pts" "$S/shm"
  mount --bind /dev/pts "$S/pts"
  mount -t tmpfs -o mode=1777,size=64m sim-shm "$S/shm"
  ln -s /proc/self/fd "$S/fd"
  ln -s /proc/self/fd/0 "$S/stdin"
  ln -s /proc/self/fd/1 "$S/stdout"
  ln -s /proc/self/fd/2 "$S/stderr"
  : > "$S/sda"
  mount --bind "$3" "$S/sda"
  mount --move "$S" /dev
fi
if [ -n "$4" ]; then
  mount --bind "$4" /proc/sys/kernel/random/boot_id
fi
if [ -n "$5" ]; then
  while read -r src dst; do mount --bind "$src" "$dst"; done < "$5"
fi
shift 5
exec "$@"
""".replace("NODES", " ".join(DEV_NODES))


class ProcessError(RuntimeError):
    pass


@dataclass
class PrivateDev:
    """A private /dev for the namespace: `stage` is an empty directory used as mount point while building it,
    `sda` is bound at /dev/sda (a loop device, or the disk file where loop devices are missing)."""

    stage: Path
    sda: Path


class NamespacedProcess:
    """A program run as init of new PID + UTS + mount namespaces, with its own hostname."""

    def __init__(
        self,
        argv: list[str],
        *,
        hostname: str,
        env: dict[str, str] | None = None,
        private_dev: PrivateDev | None = None,
        boot_id_file: Path | None = None,
        output: Path | None = None,
        binds: list[tuple[Path, str]] | None = None,
        binds_file: Path | None = None,
    ) -> None:
        if binds and binds_file is None:
            raise ValueError("binds need a binds_file to be listed in")
        for source, target in binds or []:
            if any(c.isspace() for c in f"{source}{target}"):
                raise ValueError(f"bind {source} -> {target}: paths must not contain white space")
        self.binds = binds or []
        self.binds_file = binds_file
        self.argv = argv
        self.hostname = hostname
        self.env = env
        self.private_dev = private_dev
        self.boot_id_file = boot_id_file
        # None: stdout and stderr are piped for the caller to read; otherwise both are appended to this file.
        self.output = output
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        dev_stage, sda = "", ""
        if self.private_dev is not None:
            self.private_dev.stage.mkdir(parents=True, exist_ok=True)
            dev_stage, sda = str(self.private_dev.stage), str(self.private_dev.sda)
        binds = ""
        if self.binds and self.binds_file is not None:
            self.binds_file.write_text("".join(f"{source} {target}\n" for source, target in self.binds))
            binds = str(self.binds_file)
        argv = [
            "unshare",
            "--pid",
            "--kill-child=SIGKILL",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            _NAMESPACE_INIT,
            "sh",
            self.hostname,
            dev_stage,
            sda,
            str(self.boot_id_file or ""),
            binds,
            *self.argv,
        ]
        if self.output is None:
            self.process = await self._spawn(argv, asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT)
        else:
            with open(self.output, "ab") as out:
                self.process = await self._spawn(argv, out, out)

    async def _spawn(self, argv: list[str], stdout: Any, stderr: Any) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=self.env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        """Host PID of the program (the namespace init), or None when it is not running."""
        if self.process is None or self.process.returncode is not None:
            return None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    async def stop(self) -> None:
        """Kill the namespace and wait until every process in it is gone."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        # Killing the namespace init makes the kernel kill and reap everything inside before unshare
        # can collect it; killing unshare first would leave that to PR_SET_PDEATHSIG asynchronously.
        target = self.pid or process.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()


@dataclass
class SshdSettings:
    listen_host: str
    listen_port: int
    host_key: Path
    authorized_keys: Path | str  # relative: to the user's home, as sshd_config(5) reads it
    pid_file: Path
    set_env: dict[str, str] = field(default_factory=dict)
    # Users refused at login (`DenyUsers`): how a switch to a configuration with a broken sshd option
    # locks root out while the open sessions go on.
    deny_users: str | None = None

    def render(self) -> str:
        for name, value in self.set_env.items():
            if any(c in name + value for c in ' "\n'):
                raise ValueError(f"sshd SetEnv {name}: names and values must not contain spaces or quotes")
        lines = [
            f"ListenAddress {self.listen_host}:{self.listen_port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "AllowUsers root",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
        ]
        if self.deny_users:
            lines.append(f"DenyUsers {self.deny_users}")
        if self.set_env:
            lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in self.set_env.items()))
        return "\n".join(lines) + "\n"


class SshDaemon:
    """A real `sshd -D -e` in its own namespaces; its log goes to `log_path`."""

    def __init__(
        self,
        settings: SshdSettings,
        *,
        config_path: Path,
        log_path: Path,
        hostname: str,
        private_dev: PrivateDev | None = None,
        boot_id_file: Path | None = None,
        binds: list[tuple[Path, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log_path = log_path
        self._process = NamespacedProcess(
            [SSHD, "-D", "-e", "-f", str(config_path)],
            hostname=hostname,
            private_dev=private_dev,
            boot_id_file=boot_id_file,
            binds=binds,
            binds_file=config_path.with_name("binds"),
        )
        self._listening = 0  # "Server listening" lines seen: one per start and per reload
        self._line_seen = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def write_config(self) -> None:
        self.config_path.write_text(self.settings.render())

    async def start(self, timeout: float = 20.0) -> None:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.write_config()
        await self._process.start()
        self._reader = asyncio.create_task(self._read_log())
        await self._wait_listening(1, timeout)

    async def reload(self, timeout: float = 20.0) -> None:
        """Re-read the config and host key (SIGHUP makes sshd re-exec); open sessions stay."""
        self.write_config()
        pid = self.pid
        if pid is None:
            raise ProcessError("sshd is not running")
        expected = self._listening + 1
        os.kill(pid, signal.SIGHUP)
        await self._wait_listening(expected, timeout)

    async def stop(self) -> None:
        await self._process.stop()
        if self._reader is not None:
            await self._reader
            self._reader = None

    async def _read_log(self) -> None:
        process = self._process.process
        assert process is not None and process.stdout is not None
        with open(self.log_path, "ab") as logfile:
            async for line in process.stdout:
                logfile.write(line)
                logfile.flush()
                if b"Server listening on" in line:
                    self._listening += 1
                self._line_seen.set()
        self._line_seen.set()

    async def _wait_listening(self, count: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._listening < count:
            if self._reader is None or self._reader.done():
                raise ProcessError(f"sshd exited before listening; log: {self._log_tail()}")
            self._line_seen.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProcessError(f"sshd did not listen within {timeout:.0f}s; log: {self._log_tail()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._line_seen.wait(), remaining)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"


class FaultProxy:
    """A TCP proxy in front of sshd, only while an SSH fault needs one: it cuts each connection after
    `drop_after_bytes` bytes from the client, and calls `before_connection(n)` before forwarding the n-th."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        backend_port: int,
        drop_after_bytes: int | None,
        before_connection: Callable[[int], Awaitable[None]],
    ) -> None:
        self.host = host
        self.port = port
        self.backend_port = backend_port
        self.drop_after_bytes = drop_after_bytes
        self.before_connection = before_connection
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # Connections are forwarded in arrival order, so the n-th one sees what `before_connection(n)` did.
        self._order = asyncio.Lock()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            async with self._order:
                self.connections += 1
                await self.before_connection(self.connections)
                backend_reader, backend_writer = await asyncio.open_connection(self.host, self.backend_port)
            self._writers.add(backend_writer)
            try:
                async with asyncio.TaskGroup() as pumps:
                    pumps.create_task(self._pump(reader, backend_writer, self.drop_after_bytes, writer))
                    pumps.create_task(self._pump(backend_reader, writer, None, backend_writer))
            finally:
                backend_writer.transport.abort()
                self._writers.discard(backend_writer)
        except* (OSError, ProcessError) as group:
            log.warning("fault proxy %s:%s: connection ended: %s", self.host, self.port, group.exceptions[0])
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        limit: int | None,
        src_writer: asyncio.StreamWriter,
    ) -> None:
        sent = 0
        while True:
            data = await src.read(65536)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            if limit is not None and sent + len(data) >= limit:
                dst.write(data[: limit - sent])
                with contextlib.suppress(OSError):
                    await dst.drain()
                # The cut: both sides see the connection reset mid-stream.
                dst.transport.abort()
                src_writer.transport.abort()
                return
            sent += len(data)
            dst.write(data)
            await dst.drain()
