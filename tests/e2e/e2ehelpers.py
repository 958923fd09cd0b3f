"""Helpers of the end-to-end tests: a fleet previewed and run through the local engine, what it recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcloud import Client

from dabei_component.component import FleetArgs
from dabei_component.demo import SimHandle
from dabei_component.localup import DYNAMIC, LocalEngine
from dabei_component.program import declare
from dabei_component.sim.client import ControlClient

UPDATE, CREATE, DELETE = "update", "create", "delete"


def preview(engine: LocalEngine, args: FleetArgs, name: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The fleet's preview as {resource: (operation, property paths)}; the plan is printed for the log."""
    plan = engine.preview(lambda: declare(args, name=name))
    print(plan.render())
    return plan.changes()


def up(engine: LocalEngine, args: FleetArgs, name: str) -> dict[str, Any]:
    """`up` of the fleet; its outputs."""
    outputs = engine.up(lambda: declare(args, name=name))
    # What `up` did is what its own preview said it would do.
    assert engine.last_plan.changes().keys() == engine.last_preview.changes().keys()
    return outputs


def step_hosts(engine: LocalEngine, name: str, step: str) -> dict[str, Any]:
    """The per-host outputs a step recorded."""
    return engine.state[f"{DYNAMIC}::{name}-{step}"].outputs["hosts"]


def rootfs(control: ControlClient, server_id: Any) -> Path:
    """The simulated server's root filesystem."""
    return Path(control.server(int(server_id))["machine"]["rootfs"])


def servers_named(sim: SimHandle, prefix: str) -> list[str]:
    """The names of the simulator's servers that start with `prefix`."""
    client = Client(token=sim.token, api_endpoint=sim.endpoint)
    return sorted(s.name for s in client.servers.get_all() if s.name.startswith(prefix))
