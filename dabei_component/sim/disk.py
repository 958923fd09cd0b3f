"""A simulated server disk: a sparse file, attached to a loop device while the rescue system runs."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# `losetup -f --show` picks the first free device and then claims it; two machines booting at the same time
# could pick the same one, so attaching is serialized across all machines of this process.
_LOSETUP_LOCK = threading.Lock()


class DiskError(RuntimeError):
    pass


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def loop_devices_backing(path: Path) -> list[str]:
    """The loop devices attached to `path` (`losetup -j`), so stale ones can be released."""
    result = _run(["losetup", "--noheadings", "--output", "NAME", "-j", str(path)])
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


class Disk:
    """The server's disk: a sparse file of `size` bytes, created once and kept across boots."""

    def __init__(self, path: Path, size: int) -> None:
        if size <= 0:
            raise ValueError(f"disk size must be a positive number of bytes, got {size!r}")
        self.path = path
        self.size = size
        self.loop_device: str | None = None
        # Why /dev/sda is a plain file instead of a loop device, when it is.
        self.fallback_reason: str | None = None

    def ensure(self) -> None:
        """Create the sparse file if it does not exist yet; an existing disk keeps its content."""
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.truncate(self.size)

    def grow(self, size: int) -> None:
        """A bigger disk with the same content (Hetzner's `change_type` with `upgrade_disk`); the server is
        off, so no loop device is attached."""
        if size < self.size:
            raise ValueError(f"a disk never shrinks: {size} < {self.size} bytes")
        self.size = size
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(size)

    @property
    def block_source(self) -> Path:
        """What the rescue system sees as /dev/sda: the loop device, or the file itself in the fallback."""
        return Path(self.loop_device) if self.loop_device else self.path

    async def attach(self) -> None:
        """Attach the file to a free loop device (no partition scan); fall back to the plain file."""
        self.ensure()
        if self.loop_device:
            return
        await asyncio.to_thread(self._attach_blocking)

    def _attach_blocking(self) -> None:
        with _LOSETUP_LOCK:
            # A crashed earlier run may have left this file attached; only this machine uses the file.
            for stale in loop_devices_backing(self.path):
                log.warning("releasing stale loop device %s of %s", stale, self.path)
                _run(["losetup", "-d", stale])
            result = _run(["losetup", "-f", "--show", str(self.path)])
        if result.returncode == 0 and result.stdout.strip():
            self.loop_device = result.stdout.strip()
            self.fallback_reason = None
            return
        self.loop_device = None
        self.fallback_reason = f"losetup failed: {result.stderr.strip() or 'no loop device'}"
        log.warning(
            "LOOP DEVICES UNAVAILABLE (%s): the rescue system's /dev/sda is the plain file %s",
            self.fallback_reason,
            self.path,
        )

    async def detach(self) -> None:
        """Release the loop device; the caller has already stopped every process that used it."""
        device, self.loop_device = self.loop_device, None
        if device is None:
            return
        result = await asyncio.to_thread(_run, ["losetup", "-d", device])
        if result.returncode != 0:
            raise DiskError(f"losetup -d {device} failed: {result.stderr.strip()}")

    def remove(self) -> None:
        if self.loop_device is not None:
            raise DiskError(f"disk {self.path} is still attached to {self.loop_device}")
        if self.path.exists():
            os.unlink(self.path)
