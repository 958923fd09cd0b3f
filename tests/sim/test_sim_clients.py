"""A client in another language (Node.js, polling like hcloud-go) works against the simulator unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import hcloud
import requests

from dabei_component.sim import Simulator

SCRIPT = Path(__file__).parent / "clients" / "poll_actions.mjs"


def test_node_client_polls_actions_by_id(sim: Simulator, client: hcloud.Client) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is required for this test (apt-get install nodejs)"
    # Long enough that the client sees the actions running, whatever the machine's speed.
    durations = requests.put(
        f"{sim.control_url}/durations", json={"create": 0.5}, headers={"Authorization": f"Bearer {sim.token}"}
    )
    assert durations.status_code == 200
    env = {**os.environ, "SIM_ENDPOINT": sim.endpoint, "SIM_TOKEN": sim.token}
    result = subprocess.run(
        [node, str(SCRIPT), "from-node"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert sim.token not in result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert [(a["command"], a["status"], a["progress"]) for a in summary["actions"]] == [
        ("create_server", "success", 100),
        ("start_server", "success", 100),
    ]
    assert summary["polls"] >= 2  # it saw the actions running before they finished
    server = client.servers.get_by_id(summary["server_id"])
    assert (server.name, server.status, server.location and server.location.name) == ("from-node", "running", "nbg1")
