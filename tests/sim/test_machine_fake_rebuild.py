"""The simulated `nixos-rebuild switch`, run as the real first-boot program runs it: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dabei_component.sim import Durations
from dabei_component.sim.fake_rebuild import store_hash, system_path
from dabei_component.sim.machine import InstalledNixosHook, Machine, MachineSpec


def rebuild(
    root: Path, flake: str = "github:example/fleet", hostname: str = "web-1", extra: tuple[str, ...] = ()
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


def test_switch_records_the_flake_and_points_current_system(tmp_path: Path) -> None:
    result = rebuild(tmp_path, "github:example/fleet?rev=1")
    assert result.returncode == 0, result.stderr
    current = os.readlink(tmp_path / "run/current-system")
    assert current == system_path("github:example/fleet?rev=1", "web-1")
    assert current.startswith("/nix/store/") and current.endswith("-nixos-system-web-1")
    assert current in result.stdout

    assert rebuild(tmp_path, "github:example/fleet?rev=2").returncode == 0
    assert os.readlink(tmp_path / "run/current-system") == system_path("github:example/fleet?rev=2", "web-1")
    log = (tmp_path / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()
    assert log == ["github:example/fleet?rev=1", "github:example/fleet?rev=2"]


def test_store_hash_looks_like_nix() -> None:
    digest = store_hash("github:example/fleet")
    assert len(digest) == 32
    assert set(digest) <= set("0123456789abcdfghijklmnpqrsvwxyz")
    assert digest == store_hash("github:example/fleet") != store_hash("github:example/other")


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
    assert rebuild(tmp_path).returncode == 0
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


def test_rebuild_with_seconds_still_switches(tmp_path: Path) -> None:
    result = rebuild(tmp_path, extra=("--seconds", "0.1"))
    assert result.returncode == 0, result.stderr
    assert os.readlink(tmp_path / "run/current-system") == system_path("github:example/fleet", "web-1")
