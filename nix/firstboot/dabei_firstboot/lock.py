"""The run lock (``var/lib/nix-dabei/lock``): one switch, confirmation or rollback at a time."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .config import STATE_DIR, Config

_POLL_SECONDS = 0.2


class BusyError(Exception):
    """Another nix-dabei run holds the lock."""


@contextmanager
def run_lock(config: Config, wait_seconds: float = 0.0) -> Iterator[None]:
    """Hold the lock for the block; wait up to ``wait_seconds`` for it (0: fail at once). Raises BusyError."""
    path = config.path(f"{STATE_DIR}/lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    give_up = time.monotonic() + wait_seconds
    with open(path, "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise BusyError(f"another nix-dabei run is in progress (lock {path} is held)") from None
                time.sleep(_POLL_SECONDS)
        yield
