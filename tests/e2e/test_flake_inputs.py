"""A host flake's inputs through the local engine: what a host cannot fetch itself is sent into its store.

The hosts' flake has two inputs: `common`, a local directory (`path:`), and `secrets`, a private GitHub
repository. The deployer holds both (the GitHub source is put into its store as `nix flake lock` would
have fetched it with the user's credentials); the simulated hosts build in their own Nix store with no
network and no credentials, so an input that is not sent fails their build, as it would on Hetzner.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import UPDATE, up

from dabei_component.component import Deadlines, FleetArgs
from dabei_component.demo import SimHandle, demo_args, write_fixture_flake
from dabei_component.imaging import NIX_FEATURES, OFFLINE_NIX_ARGS
from dabei_component.localup import DYNAMIC, LocalEngine, UpFailed
from dabei_component.program import declare
from dabei_component.sim.client import ControlClient

pytestmark = pytest.mark.timeout(600)

REV = "0123456789abcdef0123456789abcdef01234567"


def nix(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["nix", *NIX_FEATURES, *args, *OFFLINE_NIX_ARGS], capture_output=True, text=True, check=False, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def private_github_source(tmp_path: Path) -> dict[str, Any]:
    """A source in the deployer's store as fetching `github:example/secrets` would leave it; its lock node."""
    source = tmp_path / "github" / "source"  # a fetched source's store name is `source`
    source.mkdir(parents=True)
    (source / "default.nix").write_text('{ motd = "from the private repository"; }\n')
    subprocess.run(["nix-store", "--add-fixed", "--recursive", "sha256", str(source)], capture_output=True, check=True)
    nar_hash = nix("hash", "path", str(source)).strip()
    return {
        "flake": False,
        "locked": {
            "lastModified": 1700000000,
            "narHash": nar_hash,
            "owner": "example",
            "repo": "secrets",
            "rev": REV,
            "type": "github",
        },
        "original": {"owner": "example", "repo": "secrets", "type": "github"},
    }


def flake_with_inputs(tmp_path: Path, hosts: dict[str, str]) -> Path:
    """The fixture flake whose host systems include both inputs' content, locked."""
    common = tmp_path / "common"
    common.mkdir()
    (common / "default.nix").write_text('{ motd = "from the local directory"; }\n')
    flake = write_fixture_flake(tmp_path / "infra", hosts)
    text = (flake / "flake.nix").read_text()
    for old, new in (
        (
            "outputs = { self }:",
            f'inputs.common = {{ url = "path:{common}"; flake = false; }};\n'
            '  inputs.secrets = { url = "github:example/secrets"; flake = false; };\n'
            "  outputs = { self, common, secrets }:",
        ),
        (
            'let settings = import (./hosts + "/${file}"); in {',
            'let settings = import (./hosts + "/${file}")\n'
            "          // { common = import common; secrets = import secrets; }; in {",
        ),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (flake / "flake.nix").write_text(text)
    lock = {"nodes": {"root": {"inputs": {"secrets": "secrets"}}, "secrets": private_github_source(tmp_path)}}
    (flake / "flake.lock").write_text(json.dumps({**lock, "root": "root", "version": 7}))
    nix("flake", "lock", f"path:{flake}")  # locks `common` (the GitHub input is locked already)
    return flake


def fleet(sim: SimHandle, flake: Path, prefix: str, send_inputs: str) -> FleetArgs:
    args = demo_args(1, ssh_port=sim.ssh_port, prefix=prefix)
    args.hosts[0].flake = f"path:{flake}"
    args.send_inputs = send_inputs
    args.deadlines = Deadlines(rescue=120, install=120, firstboot=120)
    return args


def sent(engine: LocalEngine, host: str) -> list[str]:
    """The provider's log lines of inputs sent to this host."""
    lines = Path(engine.server.log_path).read_text().splitlines()
    return [line for line in lines if f"[{host}] firstboot:" in line and "flake input(s)" in line]


def host_store(engine: LocalEngine, control: ControlClient, name: str, host: str) -> Path:
    server_id = int(engine.state[f"{DYNAMIC}::{name}-install"].outputs["hosts"][host]["server_id"])
    return Path(control.server(server_id)["machine"]["rootfs"]) / "nix" / "store"


def test_local_inputs_are_sent_and_a_private_github_input_fails_until_all_are_sent(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, tmp_path: Path
) -> None:
    flake = flake_with_inputs(tmp_path, {"in-1": "x86_64-linux", "all-1": "x86_64-linux"})
    archived = json.loads(nix("flake", "archive", "--json", "--dry-run", f"path:{flake}"))["inputs"]
    common, secrets = archived["common"]["path"], archived["secrets"]["path"]

    # Default: the local directory is sent; the GitHub input is left to the host, which cannot fetch it.
    with pytest.raises(UpFailed) as failed:
        up(engine, fleet(sim, flake, "in", "local"), "in")
    assert re.search(r"unable to download .*example/secrets", str(failed.value)), str(failed.value)
    assert "for a private repository, `sendInputs: all` has the deployer send every input" in str(failed.value)
    [line] = sent(engine, "in-1")
    assert "1 flake input(s) of path:" in line, line
    store = host_store(engine, control, "in", "in-1")
    assert (store / Path(common).name).is_dir(), "the local input is in the host's store"
    assert not (store / Path(secrets).name).exists()

    # `sendInputs: all`: both are sent and the host builds the system the preview evaluated.
    outputs = up(engine, fleet(sim, flake, "all", "all"), "all")
    store = host_store(engine, control, "all", "all-1")
    assert (store / Path(common).name).is_dir() and (store / Path(secrets).name).is_dir()
    system = outputs["hosts"]["all-1"]["system"]
    settings = json.loads((store / Path(system).name / "settings.json").read_text())
    assert settings["secrets"] == {"motd": "from the private repository"}
    assert settings["common"] == {"motd": "from the local directory"}


def test_a_changed_local_input_previews_the_hosts_new_system_and_is_sent_in_place(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, tmp_path: Path
) -> None:
    flake = flake_with_inputs(tmp_path, {"ch-1": "x86_64-linux"})
    args = fleet(sim, flake, "ch", "local")
    args.send_inputs = "all"
    booted = up(engine, args, "ch")["hosts"]["ch-1"]
    (tmp_path / "common" / "default.nix").write_text('{ motd = "edited"; }\n')
    nix("flake", "lock", "--update-input", "common", f"path:{flake}")
    plan = engine.preview(lambda: declare(args, name="ch"))
    op, paths = plan.changes()["ch-firstboot"]
    assert op == UPDATE and "hosts.ch-1.system" in paths
    assert any(p.startswith("sources.") and ".inputs" in p for p in paths), paths
    before = sent(engine, "ch-1")
    after = up(engine, args, "ch")["hosts"]["ch-1"]
    [line] = sent(engine, "ch-1")[len(before) :]
    assert "1 flake input(s)" in line, "only the changed input was missing on the host"
    assert after["system"] != booted["system"]
    store = host_store(engine, control, "ch", "ch-1")
    settings = json.loads((store / Path(after["system"]).name / "settings.json").read_text())
    assert settings["common"] == {"motd": "edited"}
