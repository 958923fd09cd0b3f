"""`nix-dabei grow`: the ZFS partition takes the whole disk after the image was written or the disk grew
(Hetzner's `change_type` with `upgrade_disk`), on a real GPT disk file and a real loop device, with the
data left where it was; a second run finds nothing to do."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from dabei_firstboot.seed import list_partitions

from .conftest import make_gpt_disk, run_cli, write_config

MIB = 1024 * 1024


def zfs(disk: Path | str) -> dict[str, int]:
    return next(p for p in list_partitions(disk) if p["name"] == "zfs")


def digest(disk: Path | str, part: dict[str, int]) -> str:
    with open(disk, "rb") as handle:
        handle.seek(part["offset"])
        return hashlib.sha256(handle.read(part["size"])).hexdigest()


def fill(disk: Path, part: dict[str, int]) -> None:
    with open(disk, "r+b") as handle:
        handle.seek(part["offset"])
        handle.write(os.urandom(part["size"]))


def test_grow_after_the_disk_grew_keeps_the_data_and_is_idempotent(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", size_mib=16)
    before = zfs(disk)
    fill(disk, before)
    data = digest(disk, before)
    with open(disk, "r+b") as handle:  # the resize: the same bytes on a bigger disk
        handle.truncate(64 * MIB)
    config = write_config(tmp_path, tmp_path / "root", seed_device=str(disk))

    done = run_cli(config, "grow")
    assert done.returncode == 0, done.stderr
    after = zfs(disk)
    assert after["first_lba"] == before["first_lba"]
    # The last usable sector of a 64 MiB disk with a 128-entry GPT: 33 sectors for the backup table and header.
    assert after["last_lba"] == 64 * MIB // 512 - 34
    assert digest(disk, before) == data, "growing rewrote the partition's data"
    verify = subprocess.run(["sgdisk", "--verify", str(disk)], capture_output=True, text=True, check=False)
    assert "No problems found" in verify.stdout, verify.stdout
    assert "grew partition 4" in done.stderr

    again = run_cli(config, "grow")
    assert again.returncode == 0 and "already ends at the disk's end" in again.stderr
    assert zfs(disk) == after


def test_grow_on_a_block_device_in_use_tells_the_kernel(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", size_mib=16)
    with open(disk, "r+b") as handle:
        handle.truncate(48 * MIB)
    attached = subprocess.run(["losetup", "-f", "-P", "--show", str(disk)], capture_output=True, text=True)
    if attached.returncode != 0:
        pytest.fail(f"the tests need loop devices (run as root): {attached.stderr}")
    loop = attached.stdout.strip()
    try:
        config = write_config(tmp_path, tmp_path / "root", seed_device=loop)
        done = run_cli(config, "grow")
        assert done.returncode == 0, done.stderr
        sectors = int(Path(f"/sys/class/block/{Path(loop).name}p4/size").read_text())
        part = zfs(loop)
        assert sectors == part["last_lba"] - part["first_lba"] + 1, "the kernel still has the old size"
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_grow_expands_every_vdev_of_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ZFS here: a `zpool` stand-in on PATH records what the program asks of it."""
    disk = make_gpt_disk(tmp_path / "disk.img", size_mib=16)
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "zpool").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1" = list ]; then printf "rpool\\t60G\\t1G\\n\\t/dev/disk/by-partlabel/zfs\\t60G\\t1G\\n"; fi\n'
    )
    (bin_dir / "zpool").chmod(0o755)
    config = write_config(tmp_path, tmp_path / "root", seed_device=str(disk), grow_pool="rpool")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = run_cli(config, "grow")
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        "list -v -H -P rpool",
        "online -e rpool /dev/disk/by-partlabel/zfs",
    ]


def test_a_bad_pool_name_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "root", grow_pool="rpool; reboot")
    done = run_cli(config, "grow")
    assert done.returncode == 2 and "'grow_pool'" in done.stderr
