"""`python -m dabei_component.sim serve`: one JSON line when ready; SIGTERM stops it and leaves nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import asyncssh
import hcloud
import requests
from hcloud.images import Image
from hcloud.server_types import ServerType
from simhelpers import free_port, key_ids, loop_devices_under, sim_processes


def test_serve_prints_one_line_and_sigterm_cleans_up() -> None:
    ssh_port = free_port("127.77.0.1")
    process = subprocess.Popen(
        [sys.executable, "-m", "dabei_component.sim", "serve", "--port", "0", "--ssh-port", str(ssh_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        assert set(ready) == {"endpoint", "token", "control", "ssh_port"}
        assert ready["endpoint"].startswith("http://127.0.0.1:") and ready["endpoint"].endswith("/v1")
        assert ready["control"] == ready["endpoint"].removesuffix("/v1") + "/_sim"
        assert len(ready["token"]) == 64 and ready["ssh_port"] == ssh_port

        client = hcloud.Client(token=ready["token"], api_endpoint=ready["endpoint"], poll_interval=0.05)
        public_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        key = client.ssh_keys.create(name="k", public_key=public_key)
        created = client.servers.create(
            name="served", server_type=ServerType(name="cx22"), image=Image(name="debian-12"),
            ssh_keys=[key], start_after_create=False,
        )  # fmt: skip
        created.action.wait_until_finished()
        client.servers.enable_rescue(created.server, ssh_keys=key_ids(key)).action.wait_until_finished()
        client.servers.power_on(created.server).wait_until_finished()
        details = requests.get(
            f"{ready['control']}/servers/{created.server.id}",
            headers={"Authorization": f"Bearer {ready['token']}"},
        ).json()["server"]
        state_dir = str(Path(details["state_dir"]).parent.parent)
        assert details["machine"]["mode"] == "rescue" and details["machine"]["sshd_pid"]
        assert sim_processes(state_dir) and loop_devices_under(state_dir)

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout == ""  # exactly one line was printed
    assert ready["token"] not in stderr
    assert sim_processes(state_dir) == []
    assert loop_devices_under(state_dir) == []
    assert not Path(state_dir).exists()


def test_serve_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dabei_component.sim", "serve", "--port", "70000"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "70000 is not a TCP port" in result.stderr
