"""Stacks recorded by an earlier release keep working: refresh, the move to today's resource layout, destroy.

The engine hands `read` and `delete` (and `check`/`diff` when the new inputs' provider is not known) the
`__provider` recorded in the state: a pickle of the provider class as it was when the resource was last
written, found by its import path. `fixtures/release-807a6d6.tar.gz` is that release's component (the
first one with users), unchanged; `record_release.py` runs it in its own processes to record a real stack
against the simulator, then this test carries on with today's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hcloud import Client

from dabei_component.demo import FIXTURE_FLAKE, demo_args, fixture_image_attr, provider_config, simulator
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.localup import DYNAMIC, LocalEngine, generated_keys
from dabei_component.program import declare
from dabei_component.provider_server import ProviderServer
from dabei_component.sim.client import free_port

pytestmark = pytest.mark.timeout(900)

HERE = Path(__file__).parent
RELEASE = HERE / "fixtures" / "release-807a6d6.tar.gz"


def record_with_release(tmp: Path, sim: object, fleet: str, hosts: list[str]) -> Path:
    release = tmp / "release"
    with tarfile.open(RELEASE) as tar:
        tar.extractall(release, filter="data")
    out = tmp / "state-by-release.json"
    cmd = [sys.executable, str(HERE / "record_release.py")]
    cmd += ["--endpoint", sim.endpoint, "--token", sim.token, "--ssh-port", str(sim.ssh_port)]  # type: ignore[attr-defined]
    cmd += ["--flake", f"path:{FIXTURE_FLAKE}", "--attr", fixture_image_attr(), "--work-dir", str(tmp)]
    cmd += ["--out", str(out), "--fleet", fleet, *(f"--host={h}" for h in hosts)]
    cmd += [f"--nix-arg={a}" for a in OFFLINE_NIX_ARGS]
    # The release first on the path, and a working directory outside the project (`-m` puts it first).
    env = {**os.environ, "PYTHONPATH": f"{release}:{release / 'nix' / 'firstboot'}"}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"recording with the release at {release}" in done.stderr
    return out


def test_a_stack_of_the_earlier_release_refreshes_moves_to_todays_layout_and_destroys(tmp_path: Path) -> None:
    with simulator(tmp_path / "sim", free_port()) as sim:
        state_file = record_with_release(tmp_path, sim, "up", ["up-1:fsn1", "up-2:nbg1"])
        state = LocalEngine.load_state(state_file)
        old_keys = state[f"{DYNAMIC}::up-keys"].outputs
        old_install = state[f"{DYNAMIC}::up-install"].outputs["hosts"]
        old_firstboot = state[f"{DYNAMIC}::up-firstboot"].outputs["hosts"]

        provider = ProviderServer(
            project="nix-dabei", log_path=tmp_path / "provider.log", env={"XDG_CACHE_HOME": str(tmp_path / "cache")}
        )
        try:
            provider.configure(provider_config(sim))
            client = Client(token=sim.token, api_endpoint=sim.endpoint, poll_interval=0.2)
            engine = LocalEngine(server=provider, hcloud=client, state=state)

            # Refresh reads every resource, the steps with the provider the release recorded: no step finds
            # drift. (The servers' outputs gain what the release's stand-in for pulumi-hcloud did not record.)
            refreshed = engine.refresh().changes()
            assert set(refreshed) == {"up-up-1-server", "up-up-2-server"}, refreshed

            # Today's program over the recorded stack: the host keys move into resources of their own
            # (adopting the recorded keys), the example's commands are new, nothing else changes.
            args = demo_args(2, ssh_port=sim.ssh_port, prefix="up")
            args.hosts[0].location, args.hosts[1].location = "fsn1", "nbg1"
            args.hosts[0].labels = args.hosts[1].labels = {}
            plan = engine.preview(lambda: declare(args, name="up"))
            print(plan.render())
            assert plan.changes() == {
                # The release's local engine did not record components; the Pulumi engine does.
                **{component: ("create", ()) for component in ("up", "up-up-1", "up-up-2")},
                "up-up-1-hostkey": ("create", ()),
                "up-up-2-hostkey": ("create", ()),
                "up-1-uname": ("create", ()),
                "up-2-uname": ("create", ()),
            }
            engine.up(lambda: declare(args, name="up"))
            keys = generated_keys(engine.state, "up")
            assert keys["deploy_private_key"] == old_keys["deploy_private_key"]
            assert keys["host_private_keys"] == old_keys["host_private_keys"]
            # No host was written or rebooted.
            assert engine.state[f"{DYNAMIC}::up-install"].outputs["hosts"] == old_install
            for name, host in engine.state[f"{DYNAMIC}::up-firstboot"].outputs["hosts"].items():
                assert host["boot_id"] == old_firstboot[name]["boot_id"]
            assert engine.preview(lambda: declare(args, name="up")).changes() == {}
            assert engine.refresh().changes() == {}

            deleted = engine.destroy()
            assert {c.name for c in deleted if c.op == "delete"} >= {"up-keys", "up-rescue", "up-up-1-server"}
            assert engine.state == {}
            assert [s.name for s in client.servers.get_all() if s.name.startswith("up-")] == []
        finally:
            provider.close()
