"""SSH helpers against a real sshd on loopback."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest
from sshd_fixture import SshdServer

from dabei_component import ssh
from dabei_component.keys import fingerprint, generate_ssh_keypair, known_hosts_line, parse_public_key, public_key_of


async def _connect(server: SshdServer, host_key: str | None, seconds: float = 10.0):
    return await ssh.connect(
        server.address,
        port=server.port,
        client_key=server.client.private_openssh,
        host_key=host_key,
        deadline=ssh.deadline_after(seconds),
    )


async def test_first_use_returns_the_presented_key_and_pinned_connects_succeed(sshd: SshdServer) -> None:
    conn, presented = await _connect(sshd, None)
    conn.close()
    assert presented == " ".join(sshd.host.public.split()[:2])
    conn, pinned = await _connect(sshd, presented)
    async with conn:
        result = await ssh.run(conn, "hostname; id -u", timeout=10)
    assert pinned == presented
    assert result.stdout.split()[-1] == "0"


async def test_another_host_key_than_the_pinned_one_is_refused(sshd: SshdServer) -> None:
    conn, pinned = await _connect(sshd, None)
    conn.close()
    sshd.restart(new_host_key=True)
    with pytest.raises(ssh.HostKeyMismatch) as raised:
        await _connect(sshd, pinned, seconds=30)
    assert "another host key" in str(raised.value)


async def test_connect_retries_until_sshd_listens(sshd: SshdServer) -> None:
    sshd.stop()
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, sshd.start)
    conn, _ = await _connect(sshd, None, seconds=20)
    conn.close()


async def test_connect_gives_up_at_the_deadline(sshd: SshdServer) -> None:
    sshd.stop()
    with pytest.raises(ssh.SshError, match="no connection before the deadline"):
        await _connect(sshd, None, seconds=1.0)


async def test_an_unknown_client_key_is_denied_without_showing_the_key(sshd: SshdServer) -> None:
    stranger = generate_ssh_keypair()
    with pytest.raises(ssh.SshError) as raised:
        await ssh.connect(
            sshd.address,
            port=sshd.port,
            client_key=stranger.private_openssh,
            host_key=None,
            deadline=ssh.deadline_after(10),
        )
    assert "permission denied" in str(raised.value)
    assert stranger.private_openssh.splitlines()[1] not in str(raised.value)


async def test_a_malformed_client_key_is_reported_without_echoing_it(sshd: SshdServer) -> None:
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(ssh.SshError, match="client_key") as raised:
        await ssh.connect(
            sshd.address, port=sshd.port, client_key=secret, host_key=None, deadline=ssh.deadline_after(5)
        )
    assert "bm90IGEga2V5" not in str(raised.value)


async def test_run_passes_input_and_reports_failures_with_stderr(sshd: SshdServer) -> None:
    conn, _ = await _connect(sshd, None)
    async with conn:
        echoed = await ssh.run(conn, "cat", input=b"hello\n", timeout=10)
        assert echoed.stdout == "hello\n"
        with pytest.raises(ssh.CommandError, match="exit status 3: broken") as raised:
            await ssh.run(conn, "echo broken >&2; exit 3", timeout=10)
        assert raised.value.exit_status == 3
        unchecked = await ssh.run(conn, "exit 4", timeout=10, check=False)
        assert unchecked.exit_status == 4
        with pytest.raises(ssh.CommandError, match="timed out"):
            await ssh.run(conn, "sleep 30", timeout=0.5)


def test_public_keys_are_validated_with_errors_naming_the_input() -> None:
    pair = generate_ssh_keypair("ops@example")
    key_type, data, _ = pair.public.split()
    assert parse_public_key(f"  {pair.public}\n") == pair.public
    cases = {
        "": "ssh_keys[1]: is empty",
        f"{pair.public} {pair.public}": "several keys on one line",
        f"{pair.public}\n{pair.public}": "holds 2 lines",
        f"{key_type} AAAA!!": "not valid base64",
        f"ssh-rsa {data}": "is a 'ssh-ed25519' key, but the line says 'ssh-rsa'",
        f"ssh-dss {data}": "unsupported key type 'ssh-dss'",
        key_type: "base64 key data after 'ssh-ed25519' is missing",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_public_key(text, name="ssh_keys[1]")


def test_known_hosts_lines_and_fingerprints_match_openssh() -> None:
    pair = generate_ssh_keypair("host")
    key = " ".join(pair.public.split()[:2])
    assert known_hosts_line("127.0.0.1", pair.public) == f"127.0.0.1 {key}"
    assert known_hosts_line("127.0.0.1", pair.public, port=2222) == f"[127.0.0.1]:2222 {key}"
    assert public_key_of(pair.private_openssh) == key
    assert "<secret>" in repr(pair) and pair.private_openssh not in repr(pair)
    openssh = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=pair.public, capture_output=True, text=True)
    assert openssh.stdout.split()[1] == fingerprint(pair.public)
