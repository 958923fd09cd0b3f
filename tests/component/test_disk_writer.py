"""Writing a prepared image through a real sshd onto loop devices, with real zstd, dd and blkdiscard."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest
from dabei_firstboot.seed import encode_seed, read_seed
from sshd_fixture import LoopDevices, SshdServer, make_gpt_image

from dabei_component import disk_writer, relay, ssh
from dabei_component.disk_writer import DiskRefused, DiskWriteError, WriteProgress, write_image
from dabei_component.imaging import PreparedImage, prepare_image
from dabei_component.keys import generate_ssh_keypair

MiB = 1024 * 1024


@pytest.fixture
async def conn(sshd: SshdServer) -> AsyncIterator[asyncssh.SSHClientConnection]:
    connection, _ = await ssh.connect(
        sshd.address,
        port=sshd.port,
        client_key=sshd.client.private_openssh,
        host_key=None,
        deadline=ssh.deadline_after(10),
    )
    async with connection:
        yield connection


@pytest.fixture
def image(tmp_path: Path) -> PreparedImage:
    return prepare_image(make_gpt_image(tmp_path / "disk.img"), tmp_path / "cache")


def seed_document() -> dict:
    host = generate_ssh_keypair()
    return {
        "flake": "github:example/infra",
        "hostname": "web-1",
        "host_key": {"type": "ssh-ed25519", "private": host.private_openssh, "public": host.public},
        "authorized_keys": [generate_ssh_keypair().public],
    }


def fill(path: Path, byte: int, size: int) -> None:
    """Stale content on a disk, so the test sees whether zero regions of the image really read as zeros."""
    with open(path, "r+b") as handle:
        for _ in range(size // MiB):
            handle.write(bytes([byte]) * MiB)


def expected_disk(image: PreparedImage, seed: bytes) -> bytes:
    raw = bytearray(Path(image.image_file).read_bytes())
    raw[image.seed_offset : image.seed_offset + image.seed_size] = seed.ljust(image.seed_size, b"\0")
    return bytes(raw)


def read_device(device: str, size: int) -> bytes:
    with open(device, "rb") as handle:
        return handle.read(size)


async def test_the_image_and_seed_reach_the_disk_verified(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, loop_devices: LoopDevices
) -> None:
    device, backing = loop_devices.create(32 * MiB)
    fill(backing, 0xA5, 32 * MiB)
    doc = seed_document()
    seed = encode_seed(doc)
    reports: list[WriteProgress] = []

    report = await write_image(conn, image, disk=device, seed=seed, progress=reports.append)

    assert read_device(device, image.raw_size) == expected_disk(image, seed)
    assert read_seed(device) == doc
    assert report.bytes_sent == image.compressed_size
    assert report.raw_bytes == image.raw_size
    assert report.sparse  # loop devices zero ranges by punching holes
    assert reports[-1].bytes_sent == image.compressed_size == reports[-1].total_bytes


async def test_without_write_zeroes_offload_the_image_is_written_densely(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, loop_devices: LoopDevices, monkeypatch
) -> None:
    real_check = disk_writer.check_disk

    async def without_offload(conn, disk, needed):
        size, _ = await real_check(conn, disk, needed)
        return size, False

    monkeypatch.setattr(disk_writer, "check_disk", without_offload)
    device, backing = loop_devices.create(32 * MiB)
    fill(backing, 0x5A, 32 * MiB)
    seed = encode_seed(seed_document())
    report = await write_image(conn, image, disk=device, seed=seed)
    assert not report.sparse
    assert read_device(device, image.raw_size) == expected_disk(image, seed)


async def test_a_too_small_disk_is_refused_before_writing(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, loop_devices: LoopDevices
) -> None:
    device, backing = loop_devices.create(8 * MiB)
    fill(backing, 0xA5, 8 * MiB)
    with pytest.raises(DiskRefused) as raised:
        await write_image(conn, image, disk=device, seed=b"")
    message = str(raw := raised.value)
    assert device in message and "8388608 bytes" in message and "16777216 bytes" in message, raw
    assert read_device(device, 8 * MiB) == b"\xa5" * (8 * MiB)


async def test_non_block_and_missing_targets_are_refused(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, tmp_path: Path
) -> None:
    regular = tmp_path / "not-a-disk"
    regular.write_bytes(b"keep me")
    with pytest.raises(DiskRefused, match=f"{regular} is not a block device"):
        await write_image(conn, image, disk=str(regular), seed=b"")
    assert regular.read_bytes() == b"keep me"
    with pytest.raises(DiskRefused, match="/dev/dabei-no-such-disk does not exist"):
        await write_image(conn, image, disk="/dev/dabei-no-such-disk", seed=b"")


@pytest.fixture
def mounted_disk(loop_devices: LoopDevices, tmp_path: Path) -> Iterator[str]:
    device, _ = loop_devices.create(32 * MiB, name="mounted")
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    try:
        yield device
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


async def test_a_mounted_disk_is_refused(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, mounted_disk: str
) -> None:
    with pytest.raises(DiskRefused, match=f"{mounted_disk} is in use, mounted: {mounted_disk} on /"):
        await write_image(conn, image, disk=mounted_disk, seed=b"")


async def test_a_stream_that_differs_from_the_prepared_hash_fails(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, loop_devices: LoopDevices
) -> None:
    device, _ = loop_devices.create(32 * MiB)
    wrong = dataclasses.replace(image, compressed_sha256="0" * 64)
    with pytest.raises(DiskWriteError, match=f"sha256 {image.compressed_sha256}, expected 0000"):
        await write_image(conn, wrong, disk=device, seed=b"")


async def test_corrupted_compressed_bytes_fail_the_write(
    conn: asyncssh.SSHClientConnection, image: PreparedImage, loop_devices: LoopDevices, tmp_path: Path
) -> None:
    device, _ = loop_devices.create(32 * MiB)
    damaged = bytearray(Path(image.compressed_path).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    copy = tmp_path / "damaged.zst"
    copy.write_bytes(damaged)
    with pytest.raises(DiskWriteError, match=f"writing {device} failed"):
        await write_image(conn, dataclasses.replace(image, compressed_path=str(copy)), disk=device, seed=b"")


async def test_a_seed_larger_than_its_partition_is_refused(
    conn: asyncssh.SSHClientConnection, image: PreparedImage
) -> None:
    with pytest.raises(DiskWriteError, match="seed is 1048577 bytes, the seed partition holds 1048576"):
        await write_image(conn, image, disk="/dev/null", seed=bytes(MiB + 1))


def _kill_sessions(server: SshdServer) -> None:
    """Kill the per-connection sshd processes (children of the listener), as a dropped link would."""
    assert server.process is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server.process.pid:
            os.kill(int(entry.name), signal.SIGKILL)


@pytest.mark.parametrize("drop_after_chunks", [1, 4])
async def test_a_dropped_connection_fails_the_write(
    sshd: SshdServer,
    conn: asyncssh.SSHClientConnection,
    loop_devices: LoopDevices,
    tmp_path: Path,
    monkeypatch,
    drop_after_chunks: int,
) -> None:
    raw = make_gpt_image(tmp_path / "big.img", size=64 * MiB, random_bytes=48 * MiB)
    image = prepare_image(raw, tmp_path / "cache")
    device, _ = loop_devices.create(64 * MiB)
    monkeypatch.setattr(disk_writer, "PROGRESS_INTERVAL_SECONDS", 0.0)
    chunks = []

    def drop_link(report: WriteProgress) -> None:
        chunks.append(report)
        if len(chunks) == drop_after_chunks:
            _kill_sessions(sshd)

    with pytest.raises(DiskWriteError, match=f"writing {device}"):
        await write_image(conn, image, disk=device, seed=b"", progress=drop_link)
    assert chunks[-1].bytes_sent < image.compressed_size


async def test_streams_of_a_step_share_one_byte_budget(
    conn: asyncssh.SSHClientConnection, tmp_path: Path, loop_devices: LoopDevices
) -> None:
    # 6 MiB of random data: 6 one-MiB chunks per stream, three streams at once, room for two chunks in all.
    big = prepare_image(make_gpt_image(tmp_path / "big.img", 24 * MiB, random_bytes=6 * MiB), tmp_path / "cache")
    budget = disk_writer.ByteBudget(2 * disk_writer.CHUNK_BYTES)
    seed = encode_seed(seed_document())
    devices = [loop_devices.create(32 * MiB)[0] for _ in range(3)]
    reports = await asyncio.gather(
        *(write_image(conn, big, disk=device, seed=seed, budget=budget) for device in devices)
    )
    assert [r.raw_bytes for r in reports] == [big.raw_size] * 3
    for device in devices:
        assert read_device(device, big.raw_size) == expected_disk(big, seed)
    assert budget.used == 0
    assert disk_writer.CHUNK_BYTES <= budget.peak <= budget.limit


def test_a_byte_budget_smaller_than_a_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one chunk"):
        disk_writer.ByteBudget(disk_writer.CHUNK_BYTES - 1)


def test_the_relay_tree_and_host_key_algorithms() -> None:
    assert relay.plan_tree(1) == [[]]
    assert relay.plan_tree(6) == [[1, 2], [3, 4], [5], [], [], []]
    assert relay.plan_tree(4, fanout=1) == [[1], [2], [3], []]
    tree = relay.plan_tree(16)
    assert sorted(c for children in tree for c in children) == list(range(1, 16))  # each host fed once
    with pytest.raises(ValueError, match="fanout"):
        relay.plan_tree(3, fanout=0)
    assert relay.host_key_algorithms("ssh-ed25519 AAAA") == "ssh-ed25519"
    assert relay.host_key_algorithms("ssh-rsa AAAA") == "rsa-sha2-512,rsa-sha2-256"


def test_a_relayed_host_must_report_the_prepared_hash(image: PreparedImage) -> None:
    good = f"sha256={image.compressed_sha256}\nwritten={image.raw_size}\n"
    disk_writer.verify_facts(good, image, "/dev/sda")
    with pytest.raises(DiskWriteError, match=r"the host received compressed bytes with sha256 \(none\)"):
        disk_writer.verify_facts(f"written={image.raw_size}\n", image, "/dev/sda")
    with pytest.raises(DiskWriteError, match="with sha256 beef, expected"):
        disk_writer.verify_facts(f"sha256=beef\nwritten={image.raw_size}\n", image, "/dev/sda")
    with pytest.raises(DiskWriteError, match=f"wrote {image.raw_size - 1} bytes, expected {image.raw_size}"):
        disk_writer.verify_facts(good.replace(f"={image.raw_size}", f"={image.raw_size - 1}"), image, "/dev/sda")
    with pytest.raises(DiskWriteError, match="no stream reached the host"):
        disk_writer.verify_facts("error=no stream reached the host\n", image, "/dev/sda")
