"""A simulator on its own event-loop thread, for synchronous callers (the hcloud library, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .simulator import Simulator


class SimulatorThread:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the simulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.run(self.sim.start())

    def stop(self) -> None:
        try:
            self.run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
