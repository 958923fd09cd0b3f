"""Grow the ZFS partition and pool onto the whole disk: on the first boot (the image is smaller than any
disk) and after a resize (Hetzner's `change_type` with `upgrade_disk` makes the disk bigger, the GPT stays).

What growpart does (cloud-utils' `growpart`, which nixpkgs' grow-partition module runs), in three steps
that each do nothing when there is nothing to do, so the program runs on every boot:

1. `sgdisk --move-second-header`: the backup GPT header of a smaller image sits mid-disk; move it to the end.
2. Delete and re-create the ZFS entry with the same start, type, unique GUID and name, ending at the last
   usable sector; the data is not touched (only the partition table changes). For a block device in use,
   `partx --update` tells the kernel the partition's new size (BLKPG, as growpart does).
3. `zpool online -e` on each of the pool's vdevs (by the path the pool records): the pool takes the space.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import seed as seedlib

PARTITION_NAME = "zfs"
Run = Callable[[Sequence[str]], str]


class GrowError(Exception):
    """A tool failed or the disk is not laid out as the image lays it out."""


def run_tool(argv: Sequence[str]) -> str:
    """Run a tool; its stdout, or GrowError with its stderr."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GrowError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise GrowError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass(frozen=True)
class Grown:
    """The ZFS partition's last sector before and after (equal: nothing to grow), and the pool's vdevs."""

    number: int
    last_before: int
    last_after: int
    vdevs: tuple[str, ...] = ()

    @property
    def grew(self) -> bool:
        return self.last_after > self.last_before


def _partition(disk: str) -> dict[str, object]:
    matches = [p for p in seedlib.list_partitions(disk) if p["name"] == PARTITION_NAME]
    if len(matches) != 1:
        raise GrowError(f"{disk}: expected one partition named {PARTITION_NAME!r}, found {len(matches)}")
    return matches[0]


def _info(disk: str, number: int, run: Run) -> tuple[str, str]:
    """The partition's type GUID and unique GUID (`sgdisk --info`)."""
    text = run(["sgdisk", f"--info={number}", disk])
    type_guid = re.search(r"Partition GUID code: ([0-9A-Fa-f-]{36})", text)
    unique = re.search(r"Partition unique GUID: ([0-9A-Fa-f-]{36})", text)
    if not type_guid or not unique:
        raise GrowError(f"{disk}: sgdisk --info={number} did not show the partition's GUIDs")
    return type_guid.group(1), unique.group(1)


def _last_usable(disk: str, run: Run) -> int:
    """The last sector a partition may use, once the backup header is at the disk's end (`sgdisk -E` is
    the end of the largest free block; with the ZFS partition last, that block ends at the last usable)."""
    return int(run(["sgdisk", "--end-of-largest", disk]).strip().splitlines()[-1])


def grow(disk: str, pool: str | None, run: Run = run_tool) -> Grown:
    """Grow the ZFS partition of `disk` (a block device or an image file) to the disk's end, then `pool`.

    Raises GrowError; a disk with nothing to grow is no error (`Grown.grew` is False)."""
    run(["sgdisk", "--move-second-header", disk])
    part = _partition(disk)
    number, first, last = int(part["number"]), int(part["first_lba"]), int(part["last_lba"])  # type: ignore[call-overload]
    end = _last_usable(disk, run)
    if end > last:
        type_guid, unique = _info(disk, number, run)
        run(
            [
                "sgdisk",
                f"--delete={number}",
                f"--new={number}:{first}:{end}",
                f"--typecode={number}:{type_guid}",
                f"--partition-guid={number}:{unique}",
                f"--change-name={number}:{PARTITION_NAME}",
                disk,
            ]
        )
        if stat.S_ISBLK(os.stat(disk).st_mode):
            run(["partx", "--update", f"--nr={number}", disk])
    after = int(_partition(disk)["last_lba"])  # type: ignore[call-overload]
    vdevs: tuple[str, ...] = ()
    if pool is not None:
        listing = run(["zpool", "list", "-v", "-H", "-P", pool])
        vdevs = tuple(line.split()[0] for line in listing.splitlines() if line.strip().startswith("/"))
        for vdev in vdevs:
            run(["zpool", "online", "-e", pool, vdev])
    return Grown(number, last, max(after, last), vdevs)


def describe(disk: str | Path, result: Grown) -> str:
    if result.grew:
        return f"grew partition {result.number} of {disk} to sector {result.last_after} (was {result.last_before})"
    return f"partition {result.number} of {disk} already ends at the disk's end"
