"""Writing one image onto many hosts in rescue while it crosses the deployer's uplink once.

The deployer streams the compressed image to one host (the head); each host writes its own disk while it
forwards the stream to up to `fanout` further hosts over SSH between the servers (a tree in heap order:
host i feeds hosts fanout*i+1 ... fanout*i+fanout). Every host runs the same stream script as a direct
write and verifies what it wrote against the prepared image's sha256 (see `disk_writer.py` for what each
check proves); the deployer reads each host's result over its own pinned connection and writes the seed
there. A host whose relay fails (its parent died, its own pipeline failed) is reported as such, for the
caller to write it directly.

Trust between the hosts is set up per run and never outlives it:
- an ed25519 key made for this run, in the deployer's memory only; its private half goes to the
  relaying hosts' work directories (RAM: Hetzner's rescue system is a RAM disk), its public half into the
  receiving hosts' `/root/.ssh/authorized_keys` (where Hetzner's rescue system reads root's keys), each
  over the deployer's own pinned connection, restricted to running that host's stream script;
- a relaying host pins each child's rescue host key, the one the deployer pinned (never trust on first
  use between hosts, never host-key checking off);
- at the end, also when the run fails, the deployer removes the key lines and the work directories.
  Nothing is added to the Hetzner project.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import asyncssh

from dabei_component.disk_writer import (
    STREAM_SCRIPT,
    ByteBudget,
    DiskWriteError,
    ProgressCallback,
    WriteReport,
    human_size,
    make_work_dir,
    prepare_disk,
    report,
    stream,
    verify_facts,
    write_seed,
)
from dabei_component.imaging import PreparedImage
from dabei_component.keys import known_hosts_line
from dabei_component.ssh import SshError, run

# Each relaying host forwards to this many others: the tree of 16 hosts is 4 levels deep, and a broken
# host cuts off its own subtree only.
FANOUT = 2
# Where Hetzner's rescue system (root's home /root) reads root's authorized keys.
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
_COMMAND_SECONDS = 60.0
# How long the deployer waits for a host's stream script to end after the head's stream ended.
_FINISH_SECONDS = 120.0

Log = Callable[[str], None]


@dataclass
class RelayHost:
    """One host in rescue, reached by the deployer over `conn` (pinned `host_key`), written at `disk`."""

    name: str
    conn: asyncssh.SSHClientConnection
    address: str
    port: int
    host_key: str
    disk: str
    seed: bytes


@dataclass
class _Member:
    host: RelayHost
    work: str
    sparse: bool
    children: list[_Member]


def host_key_algorithms(public_key: str) -> str:
    """OpenSSH's HostKeyAlgorithms for a pinned key: the key's own type (RSA keys sign with SHA-2)."""
    key_type = public_key.split()[0]
    if key_type == "ssh-rsa":
        return "rsa-sha2-512,rsa-sha2-256"
    return key_type


def plan_tree(count: int, fanout: int = FANOUT) -> list[list[int]]:
    """Children of each of `count` hosts in heap order (host 0 is the head)."""
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, got {fanout}")
    return [[c for c in range(fanout * i + 1, fanout * i + fanout + 1) if c < count] for i in range(count)]


async def relay_write(
    hosts: Sequence[RelayHost],
    image: PreparedImage,
    *,
    log: Callable[[str, str], None],
    progress: ProgressCallback | None = None,
    budget: ByteBudget | None = None,
    fanout: int = FANOUT,
    timeout: float = 3600.0,
) -> dict[str, WriteReport | DiskWriteError]:
    """Write `image` and each host's seed onto all `hosts`; the deployer sends the image once.

    Returns, per host name, its WriteReport or the DiskWriteError that stopped it (DiskRefused when its
    disk was refused before anything was written: never retried). `log(name, message)` reports per host.
    """
    started = time.monotonic()
    outcome: dict[str, WriteReport | DiskWriteError] = {}
    members: list[_Member] = []

    async def prepare(host: RelayHost) -> None:
        if len(host.seed) > image.seed_size:
            outcome[host.name] = DiskWriteError(
                f"seed is {len(host.seed)} bytes, the partition holds {image.seed_size}"
            )
            return
        try:
            sparse = await prepare_disk(host.conn, host.disk, image.raw_size)
            work = await make_work_dir(host.conn)
        except DiskWriteError as exc:
            outcome[host.name] = exc
            return
        members.append(_Member(host, work, sparse, []))

    await asyncio.gather(*(prepare(h) for h in hosts))
    order = {h.name: i for i, h in enumerate(hosts)}
    members.sort(key=lambda m: order[m.host.name])
    for member, children in zip(members, plan_tree(len(members), fanout), strict=True):
        member.children = [members[c] for c in children]
    if not members:
        return outcome
    token = secrets.token_hex(8)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"dabei-relay-{token}")
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(_set_up(m, m is members[0], key, token) for m in members))
            head = members[0]
            size = f"{human_size(image.compressed_size)} compressed"
            more = f", relayed to {len(members) - 1} more host(s), {fanout} per host" if len(members) > 1 else ""
            log(head.host.name, f"writing the image to {head.host.disk} ({size}), streamed from the deployer{more}")
            for member in members:
                for child in member.children:
                    log(child.host.name, f"writing the image to {child.host.disk}, relayed from {member.host.name}")
            command = f"bash {shlex.quote(head.work + '/run')}"
            head_error: DiskWriteError | None = None
            try:
                await stream(head.host.conn, image, command, disk=head.host.disk, progress=progress, budget=budget)
            except DiskWriteError as exc:
                head_error = exc
            facts = await asyncio.gather(*(_collect(m) for m in members))
            by_name = {m.host.name: f for m, f in zip(members, facts, strict=True)}
            results = await asyncio.gather(*(_finish(m, members, by_name, image, head_error) for m in members))
            for member, result in zip(members, results, strict=True):
                if isinstance(result, DiskWriteError):
                    outcome[member.host.name] = result
                else:
                    outcome[member.host.name] = report(
                        image, member.host.disk, member.sparse, time.monotonic() - started
                    )
    except TimeoutError:
        for member in members:
            outcome.setdefault(
                member.host.name, DiskWriteError(f"the relayed write did not finish within {timeout:g}s")
            )
    finally:
        await asyncio.gather(*(_clean_up(m, token) for m in members))
    return outcome


_SET_UP = r"""
set -eu
work=$1 disk=$2 sparse=$3 key_line=$4 keys=$5
umask 077
cat > "$work/stream"
printf 'exec bash %q %q %q %q 1\n' "$work/stream" "$work" "$disk" "$sparse" > "$work/run"
if [ -n "$key_line" ]; then
    mkdir -p "$(dirname "$keys")"
    printf '%s\n' "$key_line" >> "$keys"
fi
"""


async def _set_up(member: _Member, is_head: bool, key: asyncssh.SSHKey, token: str) -> None:
    """The host's stream script; the relay key's public half (restricted to that script) unless it is the
    head; the private half, its children's list and their pinned keys when it relays."""
    host = member.host
    key_line = ""
    if not is_head:
        public = key.export_public_key("openssh").decode().strip()
        key_line = f'restrict,command="bash {member.work}/run" {public}'
    script = f"bash -c {shlex.quote(_SET_UP)} dabei " + " ".join(
        shlex.quote(str(a)) for a in (member.work, host.disk, int(member.sparse), key_line, AUTHORIZED_KEYS)
    )
    try:
        await run(host.conn, script, input=STREAM_SCRIPT, timeout=_COMMAND_SECONDS)
        if member.children:
            children = "".join(
                f"{c.host.name} {c.host.address} {c.host.port} {host_key_algorithms(c.host.host_key)}\n"
                for c in member.children
            )
            known = "".join(
                known_hosts_line(c.host.address, c.host.host_key, port=c.host.port) + "\n" for c in member.children
            )
            private = key.export_private_key("openssh").decode()
            for name, content in (("relay_key", private), ("known_hosts", known), ("children", children)):
                path = shlex.quote(f"{member.work}/{name}")
                await run(host.conn, f"umask 077; cat > {path}", input=content, timeout=_COMMAND_SECONDS)
    except SshError as exc:
        raise DiskWriteError(f"setting up the relay on {host.name} failed: {exc}") from None


# Closes the host's write to late starts, waits for its stream script to end, prints its result and the
# errors of the relays it ran to its children.
_COLLECT = r"""
work=$1 wait_seconds=$2
: > "$work/closed"
exec 9> "$work/lock"
flock -w "$wait_seconds" 9 || { echo "error=the host's stream did not end within ${wait_seconds}s"; exit 0; }
if [ -e "$work/result" ]; then cat "$work/result"; else echo "error=no stream reached the host"; fi
for log in "$work"/relay-*.log; do
    [ -s "$log" ] || continue
    name=${log##*/relay-}
    # One line: the log's lines joined by "; " (ssh's own error, then the exit status).
    echo "relay_error.${name%.log}=$(tail -c 800 "$log" | tr -d '\r' | grep -v '^$' | paste -sd ';' - | sed 's/;/; /g')"
done
"""


async def _collect(member: _Member) -> dict[str, str]:
    script = f"bash -c {shlex.quote(_COLLECT)} dabei {shlex.quote(member.work)} {int(_FINISH_SECONDS)}"
    try:
        result = await run(member.host.conn, script, timeout=_FINISH_SECONDS + _COMMAND_SECONDS)
    except SshError as exc:
        return {"error": f"reading the result failed: {exc}"}
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


async def _finish(
    member: _Member,
    members: Sequence[_Member],
    facts: Mapping[str, Mapping[str, str]],
    image: PreparedImage,
    head_error: DiskWriteError | None,
) -> DiskWriteError | None:
    """Verify what the host reports it wrote, then write its seed; the error explains a failed relay."""
    host = member.host
    own = facts[host.name]
    try:
        verify_facts(
            "\n".join(f"{k}={v}" for k, v in own.items() if not k.startswith("relay_error.")), image, host.disk
        )
        await write_seed(host.conn, host.disk, image, host.seed)
    except DiskWriteError as exc:
        parent = next((m for m in members if member in m.children), None)
        if parent is None:
            return head_error or exc
        reason = f"{exc} (relayed from {parent.host.name}"
        relay_error = facts[parent.host.name].get(f"relay_error.{host.name}", "").strip()
        reason += f": {relay_error})" if relay_error else ")"
        return DiskWriteError(reason)
    return None


_CLEAN_UP = r"""
work=$1 token=$2 keys=$3
if [ -f "$keys" ]; then
    grep -v -- " dabei-relay-$token\$" "$keys" > "$keys.dabei" || true
    cat "$keys.dabei" > "$keys"
    rm -f "$keys.dabei"
fi
rm -rf "$work"
"""


async def _clean_up(member: _Member, token: str) -> None:
    script = f"bash -c {shlex.quote(_CLEAN_UP)} dabei " + " ".join(
        shlex.quote(a) for a in (member.work, token, AUTHORIZED_KEYS)
    )
    with contextlib.suppress(SshError):
        await run(member.host.conn, script, timeout=_COMMAND_SECONDS, check=False)
