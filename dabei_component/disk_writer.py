"""Writing a prepared image onto a server's disk from its rescue system, over SSH.

Steps on the host: check the disk (block device, not in use, large enough) before touching it; discard
it and zero the image range; stream the compressed image into `zstd -d --sparse -o DISK` (older zstd:
`zstd -d | dd conv=sparse`), on a relaying host also forwarding it to the next hosts (see `relay.py`);
verify; write the per-host seed and flush the device.

What each check proves, and why together they are enough:
- sha256 of the compressed bytes, equal to the hash taken when the image was prepared. On a direct
  stream the deployer hashes what it reads and sends (in the reading thread); on a relayed host the
  host hashes what it received (OpenSSL's sha256, which uses the CPU's SHA extensions: about 4x
  coreutils' sha256sum here). Either way: the bytes decompressed are the image that was prepared, not a
  cache file changed since. On a relayed host the host's own hash is what proves it: SSH authenticates
  each hop, but a relaying host could forward other bytes, so the deployer's hash says nothing there.
  A direct stream needs no hash on the host (see the SSH channel below); skipping it there saves `tee`,
  which copies every byte in small reads and writes, and the hasher (bench/README.md).
- The SSH channel's integrity (AES-GCM or chacha20-poly1305: every packet authenticated, with
  sequence numbers): the host received exactly the bytes its sender sent, none changed, lost or
  reordered; the end of the stream is an authenticated message, so a cut connection shows as a stream
  that ends early.
- zstd's content checksum of every frame (`--check` at preparation, verified by `zstd -d`), and zstd
  failing on a truncated or damaged frame: the raw bytes written are the bytes that were compressed, so
  the pipes and the decompressor on the host did not damage them, and a stream that ends early fails.
- The decompressor's count of bytes written equals the image's raw size: the whole image reached the
  disk, not a prefix of whole frames.
- The seed is read back from the device (O_DIRECT where aligned) and compared by sha256.
Not re-checked: hashing the 3 GiB raw disk after writing would cost more than the transfer and proves
nothing the checks above do not, short of a disk that loses acknowledged writes (the next boot's ZFS
checksums would see that).

Zeros and `conv=sparse`: dd skips all-zero blocks, so the disk must read back zeros there. Discard alone
does not promise that (devices may return old data after discard), so the image range is zeroed with
`blkdiscard -z` when the device offloads write-zeroes (cheap: no data moves); otherwise the image is
written densely, zeros included. The same holds for zstd --sparse, which writes the disk directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from dabei_component.imaging import PreparedImage
from dabei_component.ssh import CommandError, SshError, run

# Reads of the compressed file, handed to asyncssh as they are (it keeps a reference until sent, so a
# reused buffer would be overwritten under it).
CHUNK_BYTES = 1024 * 1024
# asyncssh's default 64 KiB write buffer makes drain() wait after every chunk; keep several in flight.
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
# Bytes that all streams of one step may hold in their send buffers together (see ByteBudget).
STEP_BUFFER_BYTES = 16 * 1024 * 1024
PROGRESS_INTERVAL_SECONDS = 1.0
_CHECK_TIMEOUT_SECONDS = 60.0
_ZERO_ALIGN = 4096
REQUIRED_TOOLS = ("blockdev", "blkdiscard", "lsblk", "zstd", "dd", "tee", "sha256sum", "mkfifo", "flock")


class DiskWriteError(Exception):
    """Writing the image failed; nothing about the disk's content may be assumed."""


class DiskRefused(DiskWriteError):
    """The target disk was refused before anything was written to it."""


@dataclass(frozen=True)
class WriteProgress:
    bytes_sent: int
    total_bytes: int
    seconds: float
    rate: float  # compressed bytes per second so far


@dataclass(frozen=True)
class WriteReport:
    disk: str
    bytes_sent: int
    raw_bytes: int
    seconds: float
    rate: float  # raw image bytes per second of wall time, checks and seed included
    sparse: bool
    compressed_sha256: str


ProgressCallback = Callable[[WriteProgress], None]


def _bash(script: str, *args: object) -> str:
    return "bash -c " + shlex.quote(script) + " dabei " + " ".join(shlex.quote(str(a)) for a in args)


_CHECK_DISK = r"""
set -eu
disk=$1
shift
missing=""
for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] || { echo "missing tools on the host:$missing" >&2; exit 12; }
[ -e "$disk" ] || { echo "$disk does not exist" >&2; exit 10; }
[ -b "$disk" ] || { echo "$disk is not a block device" >&2; exit 10; }
# sysfs by device number: the node may be a bind mount or symlink whose name is not the kernel's.
sysfs=/sys/dev/block/$(lsblk -ndo MAJ:MIN "$disk" | tr -d ' ')
mounted=$(lsblk -nrpo NAME,MOUNTPOINT "$disk" | awk '$2 != "" { printf " %s on %s", $1, $2 }')
[ -z "$mounted" ] || { echo "$disk is in use, mounted:$mounted" >&2; exit 11; }
for dev in $(lsblk -nrpo NAME "$disk"); do
    if awk -v d="$dev" '$1 == d { found = 1 } END { exit !found }' /proc/swaps; then
        echo "$disk is in use: $dev is active swap" >&2; exit 11
    fi
    holders=$(ls "/sys/class/block/$(basename "$dev")/holders" 2>/dev/null || true)
    [ -z "$holders" ] || { echo "$disk is in use: $dev is held by" $holders >&2; exit 11; }
done
echo "size=$(blockdev --getsize64 "$disk")"
echo "write_zeroes=$(cat "$sysfs/queue/write_zeroes_max_bytes" 2>/dev/null || echo 0)"
"""

# zstd writes the disk itself when it is recent enough: `zstd -d | dd` moves every raw byte, zeros
# included, through a pipe and costs about 4x the time here (see bench/README.md). zstd >= 1.5 never
# deletes a non-regular output file on error (older ones might unlink the device node), and skips zero
# blocks with --sparse the way dd conv=sparse does. Its verbose summary gives the bytes written.
#
# Arguments: a work directory made by `make_work_dir`, the disk, 1 for sparse writes, 1 to hash the
# compressed bytes on the host (a relayed host must; a direct stream is hashed by the deployer). A relaying host
# also has `children` there ("name address port host-key-algorithms" lines), `known_hosts` with their
# pinned rescue keys and `relay_key`: the stream is forwarded to each child's own copy of this script
# while it is written here (`tee -p` keeps writing the other outputs when one of them breaks, so a
# failing child never stops this host or its other children). The facts are printed and kept in
# `result`; the lock tells the deployer when the script is over, `closed` keeps a late start out.
STREAM_SCRIPT = r"""
set -euo pipefail
work=$1 disk=$2 sparse=$3 hash=$4
exec 9> "$work/lock"
flock -n 9 || { echo "another write to $disk is running" >&2; exit 21; }
[ ! -e "$work/closed" ] || { echo "the deployer closed this write before it began" >&2; exit 22; }
outputs=()
hasher=""
if [ "$hash" = 1 ]; then
    mkfifo "$work/compressed"
    # OpenSSL's sha256 uses the CPU's SHA extensions: 4-5x coreutils' sha256sum (bench/README.md).
    if command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 -r < "$work/compressed" > "$work/sha256" &
    else
        sha256sum < "$work/compressed" > "$work/sha256" &
    fi
    hasher=$!
    outputs+=("$work/compressed")
fi
relays=()
if [ -s "$work/children" ]; then
    while read -r name address port algorithms; do
        mkfifo "$work/to-$name"
        { ssh -i "$work/relay_key" -p "$port" -l root -o IdentitiesOnly=yes -o IdentityAgent=none \
            -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$work/known_hosts" \
            -o GlobalKnownHostsFile=/dev/null -o HostKeyAlgorithms="$algorithms" -o CheckHostIP=no \
            -o UpdateHostKeys=no -o Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com \
            -o Compression=no -o ConnectTimeout=15 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \
            -o LogLevel=ERROR "$address" < "$work/to-$name" > /dev/null \
            || echo "the relay's ssh exited with status $?" >&2; } 2> "$work/relay-$name.log" &
        relays+=($!)
        outputs+=("$work/to-$name")
    done < "$work/children"
fi
version=$(zstd -V | sed -n 's/.* v\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p')
major=${version% *} minor=${version#* }
if [ -n "$version" ] && { [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 5 ]; }; }; then
    mode=--no-sparse
    [ "$sparse" = 1 ] && mode=--sparse
    decompress() { zstd -d -f -v $mode -o "$disk" 2> "$work/log"; }
    written() { sed -n 's/.*: \([0-9]*\) bytes *$/\1/p' "$work/log" | tail -n 1; }
else
    conv=""
    [ "$sparse" = 1 ] && conv="conv=sparse"
    decompress() { zstd -d -q -c | LC_ALL=C dd of="$disk" bs=4M iflag=fullblock $conv 2> "$work/log"; }
    written() { tail -n 1 "$work/log" | cut -d' ' -f1; }
fi
status=0
# tee only where the stream goes elsewhere too: it copies every byte in small reads and writes.
if [ ${#outputs[@]} -gt 0 ]; then
    tee -p "${outputs[@]}" | decompress || status=$?
else
    decompress || status=$?
fi
written=$(written)
if [ -n "$hasher" ]; then wait "$hasher" || { [ "$status" -ne 0 ] || status=23; }; fi
if [ "$status" -ne 0 ]; then
    echo "error=the host's pipeline exited with $status: $(tail -c 2000 "$work/log" | tr '\n' ' ')" > "$work/result"
else
    [ -z "$hasher" ] || echo "sha256=$(cut -d' ' -f1 "$work/sha256")" > "$work/result"
    echo "written=$written" >> "$work/result"
fi
cat "$work/result"
for pid in ${relays[@]+"${relays[@]}"}; do wait "$pid" || true; done
[ "$status" -eq 0 ] || { tail -c 2000 "$work/log" >&2; exit 20; }
"""


def _facts(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def human_size(n: float) -> str:
    """`2.8 KiB`, `371.2 MiB`: for progress lines."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB ({size} bytes)"


async def check_disk(conn: asyncssh.SSHClientConnection, disk: str, needed: int) -> tuple[int, bool]:
    """Refuse a disk that is not a block device, is in use, or is smaller than `needed` bytes.

    Returns the disk size and whether it zeroes ranges without moving data (write-zeroes offload).
    """
    try:
        result = await run(conn, _bash(_CHECK_DISK, disk, *REQUIRED_TOOLS), timeout=_CHECK_TIMEOUT_SECONDS)
    except CommandError as exc:
        if exc.exit_status in (10, 11, 12):
            raise DiskRefused(f"disk {disk} refused: {exc.stderr.strip()}") from None
        raise DiskWriteError(f"checking disk {disk} failed: {exc}") from None
    except SshError as exc:
        raise DiskWriteError(f"checking disk {disk} failed: {exc}") from None
    facts = _facts(result.stdout)
    try:
        size, write_zeroes = int(facts["size"]), int(facts["write_zeroes"])
    except (KeyError, ValueError):
        raise DiskWriteError(f"checking disk {disk}: unexpected answer {result.stdout[:200]!r}") from None
    if size < needed:
        raise DiskRefused(f"disk {disk} refused: it holds {_gib(size)}, the image needs {_gib(needed)}")
    return size, write_zeroes > 0


class ByteBudget:
    """Bytes that the streams of one step may hold in their SSH send buffers together, so the provider's
    memory does not grow with the number of hosts written at once (1 MiB chunks: with 16 MiB, 16 streams
    still keep about one chunk each in flight). A stream takes a chunk's bytes before writing it and gives
    back what has left its buffer; a stream that waits keeps giving back, so waiting never deadlocks."""

    def __init__(self, limit: int = STEP_BUFFER_BYTES) -> None:
        if limit < CHUNK_BYTES:
            raise ValueError(f"a byte budget needs at least one chunk ({CHUNK_BYTES} bytes), got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0

    async def take(self, count: int, give_back: Callable[[], None]) -> None:
        while self.used + count > self.limit:
            give_back()
            if self.used + count <= self.limit:
                break
            await asyncio.sleep(0.005)
        self.used += count
        self.peak = max(self.peak, self.used)

    def give(self, count: int) -> None:
        self.used -= count


async def make_work_dir(conn: asyncssh.SSHClientConnection) -> str:
    """A new private directory for one write on the host (root's rescue system lives in RAM)."""
    try:
        result = await run(conn, "mktemp -d /tmp/dabei-write.XXXXXX", timeout=_CHECK_TIMEOUT_SECONDS)
    except SshError as exc:
        raise DiskWriteError(f"making a work directory on the host failed: {exc}") from None
    work = result.stdout.strip()
    if not re.fullmatch(r"/tmp/dabei-write\.[A-Za-z0-9]+", work):
        raise DiskWriteError(f"making a work directory on the host: unexpected answer {work[:200]!r}")
    return work


async def remove_work_dir(conn: asyncssh.SSHClientConnection, work: str) -> None:
    with contextlib.suppress(SshError):
        await run(conn, f"rm -rf {shlex.quote(work)}", timeout=_CHECK_TIMEOUT_SECONDS, check=False)


async def prepare_disk(conn: asyncssh.SSHClientConnection, disk: str, raw_size: int) -> bool:
    """Check the disk (DiskRefused), discard it and zero the image range; True when writes may be sparse."""
    disk_size, zeroes_offloaded = await check_disk(conn, disk, raw_size)
    await _clear(conn, disk, disk_size, raw_size, zeroes_offloaded)
    return zeroes_offloaded


async def write_image(
    conn: asyncssh.SSHClientConnection,
    image: PreparedImage,
    *,
    disk: str = "/dev/sda",
    seed: bytes,
    progress: ProgressCallback | None = None,
    timeout: float = 3600.0,
    budget: ByteBudget | None = None,
) -> WriteReport:
    """Write `image` and then `seed` (at the image's seed partition) onto `disk` of the host behind `conn`.

    Raises DiskRefused before anything is written (not a whole unused block device, too small), and
    DiskWriteError when the write or one of its checks fails. `budget` is shared by the streams of a step.
    """
    if len(seed) > image.seed_size:
        raise DiskWriteError(f"seed is {len(seed)} bytes, the seed partition holds {image.seed_size}")
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            sparse = await prepare_disk(conn, disk, image.raw_size)
            work = await make_work_dir(conn)
            digest = hashlib.sha256()
            try:
                command = _bash(STREAM_SCRIPT, work, disk, int(sparse), 0)
                completed = await stream(
                    conn, image, command, disk=disk, progress=progress, budget=budget, digest=digest
                )
            finally:
                await remove_work_dir(conn, work)
            verify_facts(_decoded(completed.stdout), image, disk, sent_sha256=digest.hexdigest())
            await write_seed(conn, disk, image, seed)
    except TimeoutError:
        raise DiskWriteError(f"writing {disk} did not finish within {timeout:g}s") from None
    return report(image, disk, sparse, time.monotonic() - started)


def report(image: PreparedImage, disk: str, sparse: bool, seconds: float) -> WriteReport:
    return WriteReport(
        disk=disk,
        bytes_sent=image.compressed_size,
        raw_bytes=image.raw_size,
        seconds=seconds,
        rate=image.raw_size / seconds if seconds > 0 else 0.0,
        sparse=sparse,
        compressed_sha256=image.compressed_sha256,
    )


_CLEAR = r"""
set -eu
disk=$1 zero_length=$2
# The disk was checked to be unused; --force only silences the warning about its old partition
# table (older blkdiscard lacks the flag and does not warn).
force=""
if blkdiscard --help 2>&1 | grep -q -- --force; then force=-f; fi
# Discarding the whole disk frees thin-provisioned space. Devices without discard make it fail, which
# is harmless: nothing relies on discard for zeros.
blkdiscard $force "$disk" 2>/dev/null || true
if [ "$zero_length" -gt 0 ]; then
    blkdiscard $force -z -o 0 -l "$zero_length" "$disk"
fi
"""


async def _clear(conn: asyncssh.SSHClientConnection, disk: str, disk_size: int, raw_size: int, zero: bool) -> None:
    length = min(-(-raw_size // _ZERO_ALIGN) * _ZERO_ALIGN, disk_size) if zero else 0
    try:
        await run(conn, _bash(_CLEAR, disk, length), timeout=_CHECK_TIMEOUT_SECONDS * 10)
    except SshError as exc:
        raise DiskWriteError(f"clearing disk {disk} failed: {exc}") from None


async def stream(
    conn: asyncssh.SSHClientConnection,
    image: PreparedImage,
    command: str,
    *,
    disk: str,
    progress: ProgressCallback | None,
    budget: ByteBudget | None = None,
    digest: Any = None,
) -> asyncssh.SSHCompletedProcess:
    """Send the prepared image's compressed bytes into `command` on the host; return the completed
    process once it exited 0 (DiskWriteError otherwise, with the host's own error when it gave one).
    `digest` (a hashlib object) is updated with every byte sent, in the reading thread."""
    loop = asyncio.get_running_loop()
    total = image.compressed_size
    sent = 0
    held = 0  # bytes taken from the budget and not given back yet
    fd = os.open(image.compressed_path, os.O_RDONLY)
    process: asyncssh.SSHClientProcess[bytes] | None = None
    pending: asyncio.Future[bytes] | None = None

    def read() -> bytes:
        chunk = os.read(fd, CHUNK_BYTES)
        if digest is not None:
            digest.update(chunk)  # hashlib releases the GIL for large updates
        return chunk

    def give_back() -> None:
        nonlocal held
        if budget is not None and process is not None:
            buffered = min(held, process.stdin.channel.get_write_buffer_size())
            budget.give(held - buffered)
            held = buffered

    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        process = await conn.create_process(command, encoding=None)
        process.stdin.channel.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        started = last_report = time.monotonic()
        # The next read runs in a thread while the current chunk is sent: a cold page cache must not
        # stall the event loop, which may be streaming to other hosts too.
        pending = loop.run_in_executor(None, read)
        while True:
            chunk = await pending
            if not chunk:
                pending = None
                break
            pending = loop.run_in_executor(None, read)
            if budget is not None:
                await budget.take(len(chunk), give_back)
                held += len(chunk)
            process.stdin.write(chunk)
            await process.stdin.drain()
            give_back()
            sent += len(chunk)
            now = time.monotonic()
            if progress is not None and now - last_report >= PROGRESS_INTERVAL_SECONDS:
                last_report = now
                progress(WriteProgress(sent, total, now - started, sent / (now - started)))
        if sent != total:
            raise DiskWriteError(
                f"the prepared image {image.compressed_path} has {sent} bytes, expected {total}; prepare it again"
            )
        process.stdin.write_eof()
        completed = await process.wait()
        now = time.monotonic()
        if progress is not None:
            progress(WriteProgress(sent, total, now - started, sent / max(now - started, 1e-9)))
    except (asyncssh.Error, OSError) as exc:
        detail = await _remote_failure(process)
        reason = exc.reason if isinstance(exc, asyncssh.Error) else (str(exc) or type(exc).__name__)
        raise DiskWriteError(
            f"writing {disk} failed after {sent} of {total} compressed bytes: {detail or reason}"
        ) from None
    finally:
        if budget is not None:
            budget.give(held)
        if pending is not None:
            with contextlib.suppress(OSError):
                await pending
        os.close(fd)
        if process is not None:
            process.close()
    if completed.exit_status != 0:
        status = completed.exit_status if completed.exit_status is not None else "none (connection lost)"
        stderr = _decoded(completed.stderr).strip()
        raise DiskWriteError(f"writing {disk} failed, the host's pipeline exited with {status}: {stderr[-2000:]}")
    return completed


async def _remote_failure(process: asyncssh.SSHClientProcess[bytes] | None) -> str:
    """The remote pipeline's own error, when it ended before the stream did (for example zstd failing)."""
    if process is None:
        return ""
    with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
        completed = await asyncio.wait_for(process.wait(), timeout=5)
        stderr = _decoded(completed.stderr).strip()
        if completed.exit_status not in (None, 0):
            return f"the host's pipeline exited with {completed.exit_status}: {stderr[-2000:]}"
    return ""


def _decoded(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def verify_facts(stdout: str, image: PreparedImage, disk: str, *, sent_sha256: str | None = None) -> None:
    """Check the facts the host's stream script reported (`sha256=` when it hashed, `written=`, or
    `error=`); `sent_sha256` is the deployer's hash of what it sent, for a stream the host did not hash."""
    facts = _facts(stdout)
    if "error" in facts:
        raise DiskWriteError(f"writing {disk}: {facts['error'].strip()}")
    if sent_sha256 is not None:
        if sent_sha256 != image.compressed_sha256:
            raise DiskWriteError(
                f"writing {disk}: the deployer sent compressed bytes with sha256 {sent_sha256}, expected"
                f" {image.compressed_sha256} (the prepared image changed since it was hashed; prepare it again)"
            )
    else:
        received = facts.get("sha256", "")
        if received != image.compressed_sha256:
            raise DiskWriteError(
                f"writing {disk}: the host received compressed bytes with sha256 {received or '(none)'}, "
                f"expected {image.compressed_sha256}"
            )
    written = facts.get("written", "")
    if not re.fullmatch(r"[0-9]+", written) or int(written) != image.raw_size:
        raise DiskWriteError(
            f"writing {disk}: the decompressor wrote {written or 'an unknown number of'} bytes,"
            f" expected {image.raw_size}"
        )


async def write_seed(conn: asyncssh.SSHClientConnection, disk: str, image: PreparedImage, seed: bytes) -> None:
    """Write the seed (padded to the partition) at the image's seed partition, flush the device, read back."""
    seed = seed.ljust(image.seed_size, b"\0")
    quoted = shlex.quote(disk)
    offset, length = image.seed_offset, len(seed)
    # fsync on the block device flushes all of its dirty pages, the image's included.
    write = f"dd of={quoted} bs=64K seek={offset} oflag=seek_bytes conv=notrunc,fsync status=none"
    # Read back from the device, not the page cache, when the range allows O_DIRECT.
    direct = ",direct" if offset % _ZERO_ALIGN == 0 and length % _ZERO_ALIGN == 0 else ""
    read_back = (
        f"dd if={quoted} bs=64K skip={offset} count={length} iflag=skip_bytes,count_bytes{direct} status=none"
        " | sha256sum"
    )
    try:
        await run(conn, write, input=seed, timeout=_CHECK_TIMEOUT_SECONDS)
        result = await run(conn, read_back, timeout=_CHECK_TIMEOUT_SECONDS)
    except SshError as exc:
        raise DiskWriteError(f"writing the seed to {disk} failed: {exc}") from None
    if result.stdout.split()[:1] != [hashlib.sha256(seed).hexdigest()]:
        raise DiskWriteError(f"the seed read back from {disk} at byte {offset} differs from the seed written")
