"""SSH helpers over asyncssh: connect with host-key pinning and retries, run commands.

Host keys: a connect with `host_key=None` trusts the key the host presents (trust on first use) and
returns it; the caller pins it and passes it to every later connect of the session, which then accepts
exactly that key and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

from dabei_component.keys import fingerprint

Log = Callable[[str], None]

# Measured on this project's benchmark machine (see bench/README.md): AES-GCM uses AES-NI through
# OpenSSL and is faster than chacha20-poly1305 in asyncssh; the GCM modes need no separate MAC.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
MAC_ALGS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-256")
# The image is compressed with zstd before it is sent; zlib on top only costs CPU.
COMPRESSION_ALGS = ("none",)
# A larger receive window than asyncssh's 2 MiB default keeps output of long commands flowing.
CHANNEL_WINDOW = 8 * 1024 * 1024
KEEPALIVE_SECONDS = 15.0
KEEPALIVE_COUNT_MAX = 4

_ATTEMPT_TIMEOUT_SECONDS = 15.0
_BACKOFF_FIRST_SECONDS = 0.25
_BACKOFF_MAX_SECONDS = 5.0


class SshError(Exception):
    """An SSH connection could not be established or was lost."""


class HostKeyMismatch(SshError):
    """The host presented another key than the pinned one. Never retried."""


class CommandError(SshError):
    """A remote command failed (non-zero exit, killed by a signal, or timed out)."""

    def __init__(self, message: str, *, exit_status: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr = stderr


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str


def deadline_after(seconds: float) -> float:
    """An absolute deadline on the running event loop's clock, `seconds` from now."""
    return asyncio.get_running_loop().time() + seconds


def _no_log(_message: str) -> None:
    pass


def _openssh_public(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


async def connect(
    host: str,
    *,
    port: int = 22,
    username: str = "root",
    client_key: str,
    host_key: str | None,
    deadline: float,
    log: Log | None = None,
) -> tuple[asyncssh.SSHClientConnection, str]:
    """Connect by public key, retrying refused connections and timeouts until `deadline`.

    `deadline` is an absolute time on the event loop's clock (see `deadline_after`). Returns the
    connection and the host's public key (`type base64`): the key presented on first use when
    `host_key` is None, else `host_key` itself.
    """
    log = log or _no_log
    loop = asyncio.get_running_loop()
    try:
        private = asyncssh.import_private_key(client_key)
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise SshError("client_key: not a valid unencrypted OpenSSH private key") from None
    known_hosts: tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]] | None = None
    if host_key is not None:
        try:
            pinned = asyncssh.import_public_key(host_key)
        except (asyncssh.KeyImportError, ValueError):
            raise SshError(f"host_key for {host}:{port}: not a valid OpenSSH public key") from None
        known_hosts = ([pinned], [], [])
    where = f"{username}@{host}:{port}"
    backoff = _BACKOFF_FIRST_SECONDS
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise SshError(f"ssh {where}: no connection before the deadline ({attempt - 1} attempts)")
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    host,
                    port=port,
                    username=username,
                    client_keys=[private],
                    known_hosts=known_hosts,
                    config=None,
                    agent_path=None,
                    password_auth=False,
                    kbdint_auth=False,
                    host_based_auth=False,
                    gss_auth=False,
                    gss_kex=False,
                    preferred_auth="publickey",
                    encryption_algs=ENCRYPTION_ALGS,
                    mac_algs=MAC_ALGS,
                    compression_algs=COMPRESSION_ALGS,
                    keepalive_interval=KEEPALIVE_SECONDS,
                    keepalive_count_max=KEEPALIVE_COUNT_MAX,
                    window=CHANNEL_WINDOW,
                ),
                timeout=min(remaining, _ATTEMPT_TIMEOUT_SECONDS),
            )
        except asyncssh.HostKeyNotVerifiable:
            assert host_key is not None
            raise HostKeyMismatch(
                f"ssh {where}: the host presented another host key than the pinned {fingerprint(host_key)}"
            ) from None
        except asyncssh.PermissionDenied:
            raise SshError(f"ssh {where}: permission denied for the client key") from None
        except (OSError, TimeoutError, asyncssh.ConnectionLost) as exc:
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            wait = min(backoff, max(0.0, deadline - loop.time()))
            log(f"ssh {where}: attempt {attempt} failed ({reason}); retrying in {wait:.1f}s")
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)
            continue
        except asyncssh.Error as exc:
            raise SshError(f"ssh {where}: {exc.reason}") from None
        presented = conn.get_server_host_key()
        if presented is None:
            conn.close()
            raise SshError(f"ssh {where}: the host presented no host key")
        public = _openssh_public(presented)
        if host_key is None:
            log(f"ssh {where}: pinned host key {fingerprint(public)} on first use")
        return conn, public


async def run(
    conn: asyncssh.SSHClientConnection,
    command: str,
    *,
    input: str | bytes | None = None,
    timeout: float,
    check: bool = True,
) -> CommandResult:
    """Run `command` on the host; with `check`, a failure raises CommandError carrying stderr."""
    data = input.encode() if isinstance(input, str) else input
    try:
        completed = await conn.run(command, input=data, encoding=None, check=False, timeout=timeout)
    except asyncssh.TimeoutError as exc:
        stderr = _text(exc.stderr)
        raise CommandError(
            f"command {_short(command)} timed out after {timeout:g}s{_stderr_suffix(stderr)}", stderr=stderr
        ) from None
    except (asyncssh.Error, OSError) as exc:
        reason = exc.reason if isinstance(exc, asyncssh.Error) else str(exc)
        raise SshError(f"command {_short(command)}: connection failed: {reason}") from None
    stdout, stderr = _text(completed.stdout), _text(completed.stderr)
    status = completed.exit_status
    if status is None or status < 0:
        signal = completed.exit_signal[0] if completed.exit_signal else "unknown"
        raise CommandError(
            f"command {_short(command)} ended without an exit status (signal {signal}){_stderr_suffix(stderr)}",
            stderr=stderr,
        )
    if check and status != 0:
        raise CommandError(
            f"command {_short(command)} failed with exit status {status}{_stderr_suffix(stderr)}",
            exit_status=status,
            stderr=stderr,
        )
    return CommandResult(command=command, exit_status=status, stdout=stdout, stderr=stderr)


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data if isinstance(data, str) else ""


def _short(command: str) -> str:
    return repr(command if len(command) <= 80 else f"{command.split()[0]} ...")


def _stderr_suffix(stderr: str) -> str:
    tail = stderr.strip()[-2000:]
    return f": {tail}" if tail else ""
