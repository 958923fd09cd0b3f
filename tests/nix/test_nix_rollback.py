"""Confirmed switches through the real `nix-dabei` program: apply with a confirmation window, confirm, roll
back by request, the detached watchdog rolling back an unconfirmed switch, and a failed build left alone.

The rebuild is the simulator's fake `nixos-rebuild` (generations in the system profile, activation), and the
rollback runs its stand-ins for `nix-env --switch-generation` and `switch-to-configuration switch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dabei_firstboot import seed as seedlib

from dabei_component.sim.fake_rebuild import system_path

from .conftest import MetadataServer, run_cli, write_config

FAKE = [sys.executable, "-m", "dabei_component.sim.fake_rebuild"]
HOST = "installer-test"  # the hostname in the metadata fixture
OLD, NEW = "github:example/hosts", "github:example/hosts/v2"


@pytest.fixture
def host(tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]) -> Path:
    """A host after its first boot on generation 1 (flake OLD); returns its config file."""
    root = tmp_path / "root"
    root.mkdir()
    config = write_config(
        tmp_path,
        root,
        metadata_url=metadata_server.url,
        seed_device=str(seed_disk),
        rebuild_command=[*FAKE, "--root", str(root), "--flake", "{flake}", "--hostname", "{hostname}"],
        switch_generation_command=[*FAKE, "switch-generation", "--root", str(root), "{generation}"],
        activate_command=[*FAKE, "activate", "--root", str(root), "{system}"],
    )
    seedlib.write_seed(seed_disk, seed_doc)
    assert run_cli(config, "seed").returncode == 0
    booted = run_cli(config, "firstboot")
    assert booted.returncode == 0, booted.stderr
    return config


def root_of(config: Path) -> Path:
    return Path(json.loads(config.read_text())["root"])


def profile(root: Path) -> str:
    return os.readlink(root / "nix/var/nix/profiles/system")


def apply(config: Path, flake: str, seconds: int) -> dict[str, Any]:
    result = run_cli(config, "apply", "--flake", flake, "--confirm-seconds", str(seconds))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_a_confirmed_switch_stays(host: Path) -> None:
    root = root_of(host)
    report = apply(host, NEW, 60)
    record = report["confirm"]
    assert record["state"] == "awaiting-confirmation"
    assert record["previous"] == {
        "generation": 1,
        "system": system_path(OLD, HOST),
        "profile_system": system_path(OLD, HOST),
        "flake": OLD,
    }
    assert report["generation"] == 2 and report["system"] == system_path(NEW, HOST)
    assert "confirm" in report["features"]
    confirmed = run_cli(host, "confirm", "--token", record["token"])
    assert confirmed.returncode == 0, confirmed.stdout
    assert json.loads(confirmed.stdout)["confirm"]["state"] == "confirmed"
    # Confirmed is final: neither a late rollback nor the watchdog changes anything.
    late = run_cli(host, "rollback", "--token", record["token"])
    assert late.returncode == 1 and json.loads(late.stdout)["confirm"]["state"] == "confirmed"
    assert profile(root) == "system-2-link"
    assert os.readlink(root / "run/current-system") == system_path(NEW, HOST)
    assert run_cli(host, "confirm", "--token", "0123456789abcdef").returncode == 1


def test_a_rollback_on_request_returns_to_the_recorded_generation_and_flake(host: Path) -> None:
    root = root_of(host)
    record = apply(host, NEW, 60)["confirm"]
    back = run_cli(host, "rollback", "--token", record["token"], "--reason", "health check 'web' failed")
    assert back.returncode == 0, back.stdout + back.stderr
    answer = json.loads(back.stdout)["confirm"]
    assert answer["state"] == "rolled-back" and answer["reason"] == "health check 'web' failed"
    assert answer["rolled_back"] == {
        "from_system": system_path(NEW, HOST),
        "to_system": system_path(OLD, HOST),
        "to_generation": 1,
    }
    # The boot default is the old generation again, and it runs; the new one is kept as generation 2.
    assert profile(root) == "system-1-link"
    assert os.readlink(root / "nix/var/nix/profiles/system-2-link") == system_path(NEW, HOST)
    assert os.readlink(root / "run/current-system") == system_path(OLD, HOST)
    assert (root / "var/lib/nix-dabei/flake").read_text().strip() == OLD
    status = json.loads(run_cli(host, "status").stdout)["status"]
    assert status["phase"] == "converged" and status["flake"] == OLD
    assert status["rolled_back"]["reason"] == "health check 'web' failed"
    # Too late to confirm a switch that was rolled back.
    assert run_cli(host, "confirm", "--token", record["token"]).returncode == 1


def test_the_watchdog_rolls_back_an_unconfirmed_switch(host: Path) -> None:
    root = root_of(host)
    record = apply(host, NEW, 2)["confirm"]
    assert os.readlink(root / "run/current-system") == system_path(NEW, HOST)
    # Nobody confirms: the detached watchdog (no SSH session, no deployer) rolls back when the window ends.
    give_up = time.monotonic() + 60
    while (state := json.loads(run_cli(host, "status").stdout)["confirm"]["state"]) == "awaiting-confirmation":
        assert time.monotonic() < give_up, "the watchdog never acted"
        time.sleep(0.5)
    assert state == "rolled-back"
    answer = json.loads(run_cli(host, "status").stdout)["confirm"]
    assert answer["token"] == record["token"] and answer["reason"] == "not confirmed within 2s of the switch"
    assert profile(root) == "system-1-link"
    assert os.readlink(root / "run/current-system") == system_path(OLD, HOST)
    log = (root / "var/log/nix-dabei/firstboot.log").read_text()
    assert "rolled back to generation 1" in log


def test_a_failed_build_switches_nothing_and_rolls_nothing_back(host: Path) -> None:
    root = root_of(host)
    (root / "var/lib/nix-dabei-sim").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/nix-dabei-sim/fail-rebuilds").write_text("always\n")
    result = run_cli(host, "apply", "--flake", NEW, "--confirm-seconds", "2", timeout=300)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["confirm"]["state"] == "not-switched"
    assert "simulated failure" in report["confirm"]["reason"]
    assert report["status"]["phase"] == "failed"
    assert profile(root) == "system-1-link"
    assert os.readlink(root / "run/current-system") == system_path(OLD, HOST)
    time.sleep(3)  # the window would be over: the watchdog has nothing to undo
    assert json.loads(run_cli(host, "status").stdout)["confirm"]["state"] == "not-switched"


def test_a_bad_confirmation_window_is_refused(host: Path) -> None:
    result = run_cli(host, "apply", "--flake", NEW, "--confirm-seconds", "0")
    assert result.returncode == 2 and "--confirm-seconds" in result.stderr


def test_an_apply_that_dies_mid_build_switches_nothing(host: Path) -> None:
    """The apply killed while it builds (the deployer's session does not matter: SIGHUP is ignored, so only
    a crash does this): its rebuild dies with it, and the watchdog finds nothing switched."""
    root = root_of(host)
    config = json.loads(host.read_text())
    config["rebuild_command"] = [*config["rebuild_command"], "--seconds", "4"]
    host.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "nix" / "firstboot"))
    log = root / "var/log/nix-dabei/firstboot.log"
    seen = len(log.read_text())
    argv = ["apply", "--flake", NEW, "--confirm-seconds", "30"]
    apply = subprocess.Popen(
        [sys.executable, "-m", "dabei_firstboot", "--config", str(host), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    give_up = time.monotonic() + 60
    while "rebuild attempt 1/" not in log.read_text()[seen:]:
        assert time.monotonic() < give_up
        time.sleep(0.1)
    apply.kill()
    apply.wait()
    while json.loads(run_cli(host, "status").stdout)["confirm"]["state"] == "switching":
        assert time.monotonic() < give_up, "the watchdog never decided"
        time.sleep(0.2)
    record = json.loads(run_cli(host, "status").stdout)["confirm"]
    assert record["state"] == "not-switched"
    assert record["reason"] == "the apply that started the switch ended before finishing it"
    time.sleep(5)  # longer than the build would have taken: it never switches
    assert rebuilt_flakes(root) == [OLD]
    assert profile(root) == "system-1-link" and os.readlink(root / "run/current-system") == system_path(OLD, HOST)


def rebuilt_flakes(root: Path) -> list[str]:
    return (root / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()


def test_after_a_reboot_the_watchdog_resumes_and_rolls_back(host: Path) -> None:
    """A reboot in the window ends the watchdog; the boot unit `nix-dabei-watchdog` runs `nix-dabei watchdog`
    without a token, which finds the waiting switch and rolls it back once its window is over."""
    root = root_of(host)
    config = json.loads(host.read_text())
    config["watchdog_command"] = ["true", "{token}"]  # started, and gone at once: as after a reboot
    host.write_text(json.dumps(config))
    record = apply(host, NEW, 2)["confirm"]
    time.sleep(3)
    assert json.loads(run_cli(host, "status").stdout)["confirm"]["state"] == "awaiting-confirmation"
    resumed = run_cli(host, "watchdog")
    assert resumed.returncode == 0, resumed.stderr
    assert f"watchdog {record['token']}: resumed (awaiting-confirmation)" in resumed.stderr
    after = json.loads(run_cli(host, "status").stdout)["confirm"]
    assert after["state"] == "rolled-back" and after["reason"] == "not confirmed within 2s of the switch"
    assert profile(root) == "system-1-link" and os.readlink(root / "run/current-system") == system_path(OLD, HOST)
    # Nothing waits any more: the next boot's watchdog has nothing to do.
    again = run_cli(host, "watchdog")
    assert again.returncode == 0 and "resumed" not in again.stderr
