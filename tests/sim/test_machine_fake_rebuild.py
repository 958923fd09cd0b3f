"""The simulated `nixos-rebuild switch`, run as the real first-boot program runs it: a separate process that
builds the host's toplevel with the real `nix build` from a flake on the simulated host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dabei_component.demo import write_fixture_flake
from dabei_component.imaging import NIX_FEATURES, OFFLINE_NIX_ARGS
from dabei_component.sim import Durations
from dabei_component.sim.machine import InstalledNixosHook, Machine, MachineSpec

# The hosts' flake as the host sees it: a directory of its own root filesystem.
FLAKE = "path:/srv/fleet"


@pytest.fixture(autouse=True)
def host_flake(tmp_path: Path) -> Path:
    return write_fixture_flake(tmp_path / "srv/fleet", {"web-1": "x86_64-linux", "web-2": "aarch64-linux"})


def evaluated(flake_dir: Path, hostname: str) -> str:
    attr = f"path:{flake_dir}#nixosConfigurations.{hostname}.config.system.build.toplevel.outPath"
    cmd = ["nix", *NIX_FEATURES, "eval", "--raw", *OFFLINE_NIX_ARGS, attr]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def rebuild(
    root: Path, flake: str = FLAKE, hostname: str = "web-1", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dabei_component.sim.fake_rebuild",
            "--root",
            str(root),
            "--flake",
            flake,
            "--hostname",
            hostname,
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_switch_builds_the_hosts_toplevel_and_points_current_system_at_it(tmp_path: Path, host_flake: Path) -> None:
    result = rebuild(tmp_path)
    assert result.returncode == 0, result.stderr
    current = os.readlink(tmp_path / "run/current-system")
    assert current == evaluated(host_flake, "web-1")
    assert Path(current, "settings.json").is_file(), "built for real"
    assert current in result.stdout

    # An aarch64 host's system builds here too (the fixture systems are shell scripts).
    assert rebuild(tmp_path, hostname="web-2").returncode == 0
    assert os.readlink(tmp_path / "run/current-system") == evaluated(host_flake, "web-2")

    # A changed flake builds another system.
    (host_flake / "hosts/web-1.nix").write_text('{ system = "x86_64-linux"; motd = "changed"; }\n')
    assert rebuild(tmp_path).returncode == 0
    assert os.readlink(tmp_path / "run/current-system") == evaluated(host_flake, "web-1") != current
    log = (tmp_path / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()
    assert log == [FLAKE] * 3


def test_a_host_the_flake_does_not_define_fails_with_nixs_error(tmp_path: Path) -> None:
    result = rebuild(tmp_path, hostname="web-9")
    assert result.returncode == 1
    assert "nixosConfigurations.web-9" in result.stderr and "web-9" in result.stderr
    assert not (tmp_path / "run/current-system").exists()


def test_fail_counter_makes_the_next_rebuilds_fail(tmp_path: Path) -> None:
    counter = tmp_path / "var/lib/nix-dabei-sim/fail-rebuilds"
    counter.parent.mkdir(parents=True)
    counter.write_text("2\n")
    for remaining in (1, 0):
        result = rebuild(tmp_path)
        assert result.returncode == 1
        assert "simulated failure" in result.stderr
        assert int(counter.read_text()) == remaining
        assert not (tmp_path / "run/current-system").is_symlink()
    assert rebuild(tmp_path).returncode == 0, rebuild(tmp_path).stderr
    assert (tmp_path / "run/current-system").is_symlink()


def test_bad_arguments_and_counter_are_named(tmp_path: Path) -> None:
    result = rebuild(Path("relative/root"))
    assert result.returncode == 2 and "--root must be an absolute path" in result.stderr
    result = rebuild(tmp_path, hostname="a/b")
    assert result.returncode == 2 and "--hostname" in result.stderr
    for seconds in ("-1", "nan", "soon"):
        result = rebuild(tmp_path, extra=("--seconds", seconds))
        assert result.returncode == 2 and "--seconds" in result.stderr
    assert not (tmp_path / "run/current-system").exists()
    counter = tmp_path / "var/lib/nix-dabei-sim/fail-rebuilds"
    counter.parent.mkdir(parents=True)
    counter.write_text("sometimes\n")
    result = rebuild(tmp_path)
    assert result.returncode == 1 and "fail-rebuilds must hold a number of failures" in result.stderr


def test_always_failing(tmp_path: Path) -> None:
    counter = tmp_path / "var/lib/nix-dabei-sim/fail-rebuilds"
    counter.parent.mkdir(parents=True)
    counter.write_text("always\n")
    for _ in range(3):
        assert rebuild(tmp_path).returncode == 1
    assert counter.read_text().strip() == "always"


def test_rebuild_duration_reaches_the_rebuild_command(tmp_path: Path) -> None:
    spec = MachineSpec(1, "web-1", "127.77.200.1", "2001:db8::1", "aa:bb:cc:dd:ee:ff", 1 << 20, tmp_path, "http://x")
    durations = Durations()
    hook = InstalledNixosHook(durations=durations)
    machine = Machine(spec, ssh_port=22, boot_hook=hook)
    assert hook.program_config(machine)["rebuild_command"][-2:] == ["--seconds", "0.0"]
    durations.update({"rebuild": 2.5})  # as PUT /_sim/durations does; the next boot reads it
    assert hook.program_config(machine)["rebuild_command"][-2:] == ["--seconds", "2.5"]
    assert InstalledNixosHook().program_config(machine)["rebuild_command"][-2:] == ["--seconds", "0.0"]


def test_rebuild_with_seconds_still_switches(tmp_path: Path, host_flake: Path) -> None:
    result = rebuild(tmp_path, extra=("--seconds", "0.1"))
    assert result.returncode == 0, result.stderr
    assert os.readlink(tmp_path / "run/current-system") == evaluated(host_flake, "web-1")
