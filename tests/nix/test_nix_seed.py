"""The seed format and the GPT reader, on real disk files made by sgdisk and sfdisk."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from dabei_firstboot import seed as seedlib

from .conftest import make_gpt_disk


def test_encode_decode_round_trip(seed_doc: dict[str, Any]) -> None:
    raw = seedlib.encode_seed(seed_doc)
    assert raw[:8] == b"DABEISD\x00"
    assert int.from_bytes(raw[8:12], "big") == 1
    assert int.from_bytes(raw[12:16], "big") == len(raw) - 16
    assert seedlib.decode_seed(raw + bytes(1000)) == seed_doc


def test_encode_pads_to_size_and_refuses_too_small(seed_doc: dict[str, Any]) -> None:
    assert len(seedlib.encode_seed(seed_doc, 1024 * 1024)) == 1024 * 1024
    with pytest.raises(seedlib.SeedError, match="holds only 100"):
        seedlib.encode_seed(seed_doc, 100)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"flake": ""}, "'flake'"),
        ({"flake": "github:a/b extra"}, "'flake'"),
        ({"hostname": "bad_host!"}, "'hostname'"),
        ({"authorized_keys": "ssh-ed25519 AAAA"}, "'authorized_keys'"),
        ({"authorized_keys": ["ssh-ed25519 AAAA a\nssh-ed25519 BBBB b"]}, r"'authorized_keys\[0\]'"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_invalid_documents_are_named(seed_doc: dict[str, Any], change: dict[str, Any], message: str) -> None:
    with pytest.raises(seedlib.SeedError, match=message):
        seedlib.encode_seed(seed_doc | change)


def test_errors_never_contain_the_private_key(seed_doc: dict[str, Any]) -> None:
    private = seed_doc["host_key"]["private"]
    bad_type = seed_doc | {"host_key": seed_doc["host_key"] | {"type": "ssh-rsa"}}
    raw = seedlib.encode_seed(seed_doc)
    truncated_json = raw[:16] + raw[16:-5].replace(b"}", b"")  # invalid JSON that still holds the key
    header = bytearray(truncated_json[:16])
    header[12:16] = (len(truncated_json) - 16).to_bytes(4, "big")
    for action in (
        lambda: seedlib.encode_seed(bad_type),
        lambda: seedlib.decode_seed(bytes(header) + truncated_json[16:]),
    ):
        with pytest.raises(seedlib.SeedError) as caught:
            action()
        assert private.strip().splitlines()[1] not in str(caught.value)


def test_decode_rejects_bad_headers(seed_doc: dict[str, Any]) -> None:
    raw = bytearray(seedlib.encode_seed(seed_doc))
    with pytest.raises(seedlib.SeedEmpty):
        seedlib.decode_seed(bytes(4096))
    with pytest.raises(seedlib.SeedError, match="magic"):
        seedlib.decode_seed(b"XXXXXXXX" + bytes(raw[8:]))
    with pytest.raises(seedlib.SeedError, match="version 2"):
        seedlib.decode_seed(bytes(raw[:8]) + (2).to_bytes(4, "big") + bytes(raw[12:]))
    with pytest.raises(seedlib.SeedError, match="only"):
        seedlib.decode_seed(bytes(raw[:-10]))


def test_find_write_read_wipe_on_sgdisk_disk(seed_disk: Path, seed_doc: dict[str, Any]) -> None:
    partitions = {p["name"]: p for p in seedlib.list_partitions(seed_disk)}
    assert list(partitions) == ["bios-boot", "ESP", "dabei-seed", "zfs"]
    offset, size = seedlib.find_seed_partition(seed_disk)
    assert (offset, size) == (partitions["dabei-seed"]["offset"], 1024 * 1024)
    seedlib.write_seed(seed_disk, seed_doc)
    # The bytes really are at the partition's offset, as a component writing with dd puts them.
    with open(seed_disk, "rb") as handle:
        handle.seek(offset)
        assert handle.read(8) == b"DABEISD\x00"
    assert seedlib.read_seed(seed_disk) == seed_doc
    seedlib.wipe_seed(seed_disk)
    with open(seed_disk, "rb") as handle:
        handle.seek(offset)
        assert not any(handle.read(size))
    with pytest.raises(seedlib.SeedEmpty):
        seedlib.read_seed(seed_disk)


def test_dd_written_seed_is_read(seed_disk: Path, seed_doc: dict[str, Any], tmp_path: Path) -> None:
    offset, size = seedlib.find_seed_partition(seed_disk)
    blob = tmp_path / "seed.bin"
    blob.write_bytes(seedlib.encode_seed(seed_doc, size))
    subprocess.run(
        ["dd", f"if={blob}", f"of={seed_disk}", "bs=512", f"seek={offset // 512}", "conv=notrunc", "status=none"],
        check=True,
    )
    assert seedlib.read_seed(seed_disk) == seed_doc


def test_sfdisk_disk_with_partition_name(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    disk = tmp_path / "sfdisk.img"
    with open(disk, "wb") as handle:
        handle.truncate(8 * 1024 * 1024)
    script = 'label: gpt\nstart=2048, size=2048, name="ESP"\nstart=4096, size=2048, name="dabei-seed"\n'
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=script, text=True, check=True)
    assert seedlib.find_seed_partition(disk) == (4096 * 512, 2048 * 512)
    seedlib.write_seed(disk, seed_doc)
    assert seedlib.read_seed(disk)["flake"] == seed_doc["flake"]


def test_missing_partition_and_no_gpt(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1024 * 1024))
    with pytest.raises(seedlib.SeedError, match="no GPT header"):
        seedlib.find_seed_partition(plain)
    disk = tmp_path / "noseed.img"
    with open(disk, "wb") as handle:
        handle.truncate(8 * 1024 * 1024)
    subprocess.run(["sgdisk", "--new=1:2048:0", "--change-name=1:zfs", str(disk)], check=True, capture_output=True)
    with pytest.raises(seedlib.SeedError, match="no GPT partition named 'dabei-seed'"):
        seedlib.find_seed_partition(disk)
    with pytest.raises(seedlib.SeedError, match="cannot read disk"):
        seedlib.find_seed_partition(tmp_path / "absent.img")


def test_corrupt_gpt_is_detected(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "corrupt.img")
    with open(disk, "r+b") as handle:
        handle.seek(512 + 40)  # inside the header's first-usable-LBA field
        handle.write(b"\xff")
    with pytest.raises(seedlib.SeedError, match="checksum"):
        seedlib.find_seed_partition(disk)


def test_seed_on_a_loop_device(seed_disk: Path, seed_doc: dict[str, Any]) -> None:
    """The reader works on a block device exactly as on the file (the real host reads /dev/sda)."""
    try:
        device = subprocess.run(
            ["losetup", "-f", "--show", str(seed_disk)], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot create a loop device: {exc}")
    try:
        seedlib.write_seed(device, seed_doc)
        assert seedlib.read_seed(device) == seed_doc
        seedlib.wipe_seed(device)
        with pytest.raises(seedlib.SeedEmpty):
            seedlib.read_seed(device)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
