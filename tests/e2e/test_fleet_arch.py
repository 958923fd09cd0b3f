"""Every user's fleet through the local engine: arm64 next to x86, local flakes, the exact system in the plan.

The hosts' flakes are real flakes (copies of the fixture flake, one file per host) locked and evaluated on
the deployer; the simulated hosts receive the locked source and build it with the real `nix build`, so
the system a host runs is proven equal to the one the preview named.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from e2ehelpers import CREATE, UPDATE, preview, servers_named, step_hosts, up

from dabei_component.component import Deadlines
from dabei_component.demo import FIXTURE_FLAKE, SimHandle, demo_args, write_fixture_flake
from dabei_component.flakes import host_fetches
from dabei_component.imaging import NIX_FEATURES, OFFLINE_NIX_ARGS
from dabei_component.localup import DYNAMIC, LocalEngine, UpFailed
from dabei_component.program import declare
from dabei_component.sim.client import ControlClient
from dabei_component.sim.firmware import boot_loader

pytestmark = pytest.mark.timeout(600)


def evaluated(flake_dir: Path, host: str) -> str:
    """The host's toplevel as Nix evaluates it from the directory, independently of the component."""
    # Nix 2.8 takes a path with a space only percent-encoded in a git+file: URL.
    ref = f"git+file://{quote(str(flake_dir))}" if (flake_dir / ".git").exists() else f"path:{flake_dir}"
    attr = f"{ref}#nixosConfigurations.{host}.config.system.build.toplevel.outPath"
    done = subprocess.run(
        ["nix", *NIX_FEATURES, "eval", "--raw", *OFFLINE_NIX_ARGS, attr], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def git_flake(directory: Path, hosts: dict[str, str]) -> Path:
    """The fixture flake with these hosts, committed in a git repository (what a user's repo looks like)."""
    write_fixture_flake(directory, hosts)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(directory)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "hosts"], check=True)
    return directory


def provider_log(engine: LocalEngine) -> str:
    return Path(engine.server.log_path).read_text()


def test_a_mixed_cx_and_cax_fleet_converges_with_two_images_each_built_once(
    engine: LocalEngine, sim: SimHandle, control: ControlClient
) -> None:
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="mx")
    args.hosts[1].server_type = "cax11"
    flake = write_fixture_flake(
        Path(args.hosts[0].flake.removeprefix("path:")).with_name("mixed-arch"),
        {"mx-1": "x86_64-linux", "mx-2": "aarch64-linux"},
    )
    for host in args.hosts:
        host.flake = f"path:{flake}"
    args.deadlines = Deadlines(rescue=120, install=120, firstboot=120)
    changes = preview(engine, args, "mx")
    assert changes["mx-image"] == (CREATE, ()) and changes["mx-image-aarch64-linux"] == (CREATE, ())
    outputs = up(engine, args, "mx")

    built = [line for line in provider_log(engine).splitlines() if "image: building" in line]
    assert len(built) == 2, built
    assert any("packages.x86_64-linux.default" in b for b in built)
    assert any("packages.aarch64-linux.default" in b for b in built)
    installed = step_hosts(engine, "mx", "install")
    assert installed["mx-1"]["installed_image"] == outputs["images"]["x86_64-linux"]
    assert installed["mx-2"]["installed_image"] == outputs["images"]["aarch64-linux"]
    assert outputs["images"]["x86_64-linux"] != outputs["images"]["aarch64-linux"]
    for name, loader in (("mx-1", "i386-pc"), ("mx-2", "arm64-efi")):
        machine = control.server(int(installed[name]["server_id"]))["machine"]
        assert boot_loader(Path(machine["disk_path"])) == loader
        assert outputs["hosts"][name]["system"] == evaluated(flake, name)
    assert preview(engine, args, "mx") == {}


def test_a_cax_host_given_only_an_x86_64_image_is_refused_at_preview_before_anything_is_written(
    engine: LocalEngine, sim: SimHandle
) -> None:
    args = demo_args(1, ssh_port=sim.ssh_port, prefix="arm", server_type="cax11")
    args.image.attr = "packages.x86_64-linux.default"
    with pytest.raises(UpFailed) as refused:
        preview(engine, args, "arm")
    text = str(refused.value)
    assert "arm-1 (cax11) need an image for aarch64-linux" in text
    assert "packages.x86_64-linux.default is built for x86_64-linux" in text
    with pytest.raises(UpFailed, match="need an image for aarch64-linux"):
        engine.up(lambda: declare(args, name="arm"))
    assert servers_named(sim, "arm-") == [], "up previews first: nothing is created, nothing written"


def test_a_local_flake_in_a_git_repository_installs_and_an_edit_applies_on_that_host_only(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    # The flake lives in the Pulumi project's repository (`flake = "."`).
    project = git_flake(tmp_path / "infra", {"lf-1": "x86_64-linux", "lf-2": "x86_64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="lf")
    for host in args.hosts:
        host.flake = "."
    args.base_dir = str(project)
    outputs = up(engine, args, "lf")
    booted = step_hosts(engine, "lf", "firstboot")
    assert outputs["hosts"]["lf-1"]["system"] == evaluated(project, "lf-1")
    assert booted["lf-1"]["source_url"].startswith("git+file://")
    assert preview(engine, args, "lf") == {}

    # An edit of one host's file, not committed yet: Nix reads the working tree of a local repository.
    before = evaluated(project, "lf-1")
    (project / "hosts" / "lf-1.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    after = evaluated(project, "lf-1")
    assert after != before
    # Only the edited host's system, and the flake's source (its key in `sources` is the flake text `.`).
    source = tuple(f"sources...{f}" for f in ("host_ref", "nar_hash", "path", "url"))
    plan = engine.preview(lambda: declare(args, name="lf"))
    assert plan.changes() == {"lf-firstboot": (UPDATE, ("hosts.lf-1.system", "rollout.batches", *source))}
    # The exact store paths, as `pulumi preview --diff` shows them.
    [change] = [c for c in plan if c.name == "lf-firstboot"]
    assert f"hosts.lf-1.system: {before} => {after}" in change.diff()
    up(engine, args, "lf")
    now = step_hosts(engine, "lf", "firstboot")
    assert now["lf-1"]["system"] == after
    assert now["lf-1"]["boot_id"] == booted["lf-1"]["boot_id"], "applied in place"
    # The other host is untouched; it records that the new source builds the system it runs.
    assert {k: v for k, v in now["lf-2"].items() if k != "system_source"} == booted["lf-2"]
    assert now["lf-2"]["system_source"] == engine.state[f"{DYNAMIC}::lf-firstboot"].inputs["sources"]["."]["nar_hash"]
    assert preview(engine, args, "lf") == {}


def test_a_relative_flake_directory_resolves_against_the_project(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    # A project directory with a space in its path (Nix 2.8 reads such a path only as `.` from inside).
    project = tmp_path / "my project"
    write_fixture_flake(project / "infra", {"rel-1": "x86_64-linux"})
    args = demo_args(1, ssh_port=sim.ssh_port, prefix="rel")
    args.hosts[0].flake = "./infra"
    args.base_dir = str(project)
    outputs = up(engine, args, "rel")
    copy = write_fixture_flake(tmp_path / "copy", {"rel-1": "x86_64-linux"})
    assert outputs["hosts"]["rel-1"]["system"] == evaluated(copy, "rel-1")
    missing = demo_args(1, ssh_port=sim.ssh_port, prefix="rel")
    missing.hosts[0].flake = "./nowhere"
    missing.base_dir = str(tmp_path)
    with pytest.raises(UpFailed, match=r"nix-dabei:hosts\[0\]\.flake: cannot lock|hosts\[0\]\.flake.*not a directory"):
        preview(engine, missing, "rel")


def test_with_evaluation_off_the_source_decides_and_the_systems_are_not_known(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"ev-1": "x86_64-linux", "ev-2": "x86_64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="ev")
    for host in args.hosts:
        host.flake = str(flake)
    args.evaluate = False
    up(engine, args, "ev")
    rescue_inputs = engine.state[f"{DYNAMIC}::ev-rescue"].inputs["hosts"]
    assert rescue_inputs["ev-1"].get("system") is None and rescue_inputs["ev-1"]["source"].startswith("sha256-")
    (flake / "hosts" / "ev-1.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    changes = preview(engine, args, "ev")
    op, paths = changes["ev-firstboot"]
    assert op == UPDATE and {"hosts.ev-1.source", "hosts.ev-2.source"} <= set(paths)
    up(engine, args, "ev")
    assert step_hosts(engine, "ev", "firstboot")["ev-1"]["system"] == evaluated(flake, "ev-1")
    assert preview(engine, args, "ev") == {}


def test_the_simulated_firmware_does_not_boot_a_disk_for_the_other_architecture(tmp_path: Path) -> None:
    """Why the preview must refuse: written anyway, an x86_64 image leaves a CAX server without a system."""
    from dabei_component.sim.firmware import NotBootable, check_bootable

    images = {}
    for system in ("x86_64-linux", "aarch64-linux"):
        cmd = ["nix", *NIX_FEATURES, "build", "--no-link", "--json", *OFFLINE_NIX_ARGS]
        cmd += ["--option", "extra-platforms", "aarch64-linux", f"path:{FIXTURE_FLAKE}#packages.{system}.default"]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[0]["outputs"]["out"]
        images[system] = Path(out) / "nixos.img"
    check_bootable(images["x86_64-linux"], "x86")
    check_bootable(images["aarch64-linux"], "arm")
    with pytest.raises(NotBootable, match="boot loader is for i386-pc, this arm server's firmware boots arm64-efi"):
        check_bootable(images["x86_64-linux"], "arm")
    with pytest.raises(NotBootable, match="for arm64-efi, this x86 server's firmware boots i386-pc"):
        check_bootable(images["aarch64-linux"], "x86")


def test_a_host_that_switches_to_another_system_than_the_preview_named_fails_naming_both(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, tmp_path: Path
) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"sw-1": "x86_64-linux"})
    args = demo_args(1, ssh_port=sim.ssh_port, prefix="sw")
    args.hosts[0].flake = str(flake)
    args.deadlines = Deadlines(rescue=120, install=120, firstboot=120)
    up(engine, args, "sw")
    old_system = step_hosts(engine, "sw", "firstboot")["sw-1"]["system"]
    # The host's switch ends in another system than its flake evaluates to on the deployer.
    server_id = int(step_hosts(engine, "sw", "firstboot")["sw-1"]["server_id"])
    root = Path(control.server(server_id)["machine"]["rootfs"])
    (root / "var/lib/nix-dabei-sim/switch-to").write_text(old_system + "\n")
    (flake / "hosts" / "sw-1.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    wanted = evaluated(flake, "sw-1")
    with pytest.raises(UpFailed) as failed:
        up(engine, args, "sw")
    assert f"the host runs {old_system}, not {wanted}" in str(failed.value)
    # Once the host switches to what its flake says, the next `up` converges.
    (root / "var/lib/nix-dabei-sim/switch-to").unlink()
    up(engine, args, "sw")
    assert step_hosts(engine, "sw", "firstboot")["sw-1"]["system"] == wanted
    assert preview(engine, args, "sw") == {}


def test_a_host_its_flake_does_not_define_is_refused_at_preview_naming_it(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"nd-1": "x86_64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="nd")
    for host in args.hosts:
        host.flake = str(flake)
    with pytest.raises(UpFailed) as refused:
        preview(engine, args, "nd")
    text = str(refused.value)
    assert "nix-dabei:hosts[1].flake: cannot evaluate the systems of nd-2" in text
    assert "nixosConfigurations" in text and "nd-2" in text
    assert "hosts[0]" not in text
    assert servers_named(sim, "nd-") == []


def test_turning_evaluation_off_and_on_switches_no_host(engine: LocalEngine, sim: SimHandle, tmp_path: Path) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"tg-1": "x86_64-linux", "tg-2": "x86_64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="tg")
    for host in args.hosts:
        host.flake = str(flake)
    up(engine, args, "tg")
    # One host's file changes: only that host switches, and the other now runs what the new source builds.
    (flake / "hosts" / "tg-2.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    up(engine, args, "tg")
    booted = step_hosts(engine, "tg", "firstboot")
    args.evaluate = False
    assert preview(engine, args, "tg") == {}, "the sources are the ones the hosts built"
    up(engine, args, "tg")
    args.evaluate = True
    assert preview(engine, args, "tg") == {}, "the systems are the ones the hosts run"
    up(engine, args, "tg")
    after = step_hosts(engine, "tg", "firstboot")
    assert {n: h["converged_at"] for n, h in after.items()} == {n: h["converged_at"] for n, h in booted.items()}


def test_a_configuration_built_for_the_other_architecture_is_refused_at_preview(
    engine: LocalEngine, sim: SimHandle, tmp_path: Path
) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"wa-1": "x86_64-linux", "wa-2": "aarch64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="wa")  # both cx22: x86_64
    for host in args.hosts:
        host.flake = str(flake)
    with pytest.raises(UpFailed) as refused:
        preview(engine, args, "wa")
    text = str(refused.value)
    assert "nix-dabei:hosts[1].flake: nixosConfigurations.wa-2 is built for aarch64-linux, but its server" in text
    assert "(cx22) runs x86_64-linux" in text and "hosts[0]" not in text


def test_local_flake_mistakes_are_named_with_what_to_do(engine: LocalEngine, sim: SimHandle, tmp_path: Path) -> None:
    # A git repository at a path with a space: this Nix reads it only as its last commit.
    project = git_flake(tmp_path / "my infra", {"lm-1": "x86_64-linux", "lm-2": "x86_64-linux"})
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="lm")
    for host in args.hosts:
        host.flake = "."
    args.base_dir = str(project)
    (project / "hosts" / "lm-1.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    with pytest.raises(UpFailed) as refused:
        preview(engine, args, "lm")
    assert "Nix read the last commit of" in str(refused.value) and "hosts/lm-1.nix" in str(refused.value)

    # A host file never `git add`ed: named, with the hint.
    subprocess.run(["git", "-C", str(project), "checkout", "-q", "--", "."], check=True)
    (project / "hosts" / "lm-3.nix").write_text('{ system = "x86_64-linux"; }\n')
    more = demo_args(3, ssh_port=sim.ssh_port, prefix="lm")
    for host in more.hosts:
        host.flake = "."
    more.base_dir = str(project)
    with pytest.raises(UpFailed) as refused:
        preview(engine, more, "lm")
    text = str(refused.value)
    assert "nix-dabei:hosts[2].flake: cannot evaluate the systems of lm-3" in text
    assert "not tracked: hosts/lm-3.nix" in text and "`git add` them" in text

    # `path:` with a space is the directory as it is (untracked files included).
    plain = write_fixture_flake(tmp_path / "plain dir", {"lm-1": "x86_64-linux"})
    one = demo_args(1, ssh_port=sim.ssh_port, prefix="lm")
    one.hosts[0].flake = "path:./plain dir"
    one.base_dir = str(tmp_path)
    assert preview(engine, one, "lm")["lm-firstboot"][0] == CREATE
    assert plain.is_dir()
    # `git+file:` with a relative path: the repository as Nix reads it, against the project.
    one.hosts[0].flake = "git+file:./my infra".replace(" ", "%20")
    assert preview(engine, one, "lm")["lm-firstboot"][0] == CREATE


def test_an_unknown_server_type_is_named_by_its_config_key(engine: LocalEngine, sim: SimHandle) -> None:
    args = demo_args(2, ssh_port=sim.ssh_port, prefix="ut")
    args.hosts[1].server_type = "CAX11"
    with pytest.raises(UpFailed) as refused:
        preview(engine, args, "ut")
    assert "nix-dabei:hosts[1].serverType: cannot read server type 'CAX11'" in str(refused.value)
    assert "no server type named 'CAX11'" in str(refused.value)


def test_a_host_whose_program_predates_receive_is_named_with_what_to_do(
    engine: LocalEngine, sim: SimHandle, control: ControlClient, tmp_path: Path
) -> None:
    flake = write_fixture_flake(tmp_path / "infra", {"old-1": "x86_64-linux"})
    args = demo_args(1, ssh_port=sim.ssh_port, prefix="old")
    args.hosts[0].flake = str(flake)
    up(engine, args, "old")
    # The host's program as an earlier release installed it: no `receive` command.
    server_id = int(step_hosts(engine, "old", "firstboot")["old-1"]["server_id"])
    program = Path(control.server(server_id)["machine"]["state_dir"]) / "bin" / "nix-dabei"
    program.rename(program.with_name("nix-dabei.real"))
    program.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = receive ]; then\n'
        "  echo \"nix-dabei: error: argument command: invalid choice: 'receive' (choose from 'seed', 'apply')\" >&2\n"
        "  exit 2\n"
        "fi\n"
        f'exec {program.with_name("nix-dabei.real")} "$@"\n'
    )
    program.chmod(0o755)
    (flake / "hosts" / "old-1.nix").write_text('{ system = "x86_64-linux"; motd = "edited"; }\n')
    with pytest.raises(UpFailed) as failed:
        up(engine, args, "old")
    text = str(failed.value)
    assert "the host's nix-dabei predates `nix-dabei receive`" in text
    assert "a flake it fetches itself" in text and "`reinstall` ID" in text


@pytest.mark.parametrize(
    ("url", "fetched"),
    [
        ("github:me/infra/0123456789abcdef0123456789abcdef01234567", True),
        ("git+https://git.example.org/infra?rev=0123456789abcdef0123456789abcdef01234567", True),
        ("git+ssh://git@example.org/infra?rev=0123456789abcdef0123456789abcdef01234567", True),
        ("path:/home/me/infra?narHash=sha256-AAAA", False),
        ("git+file:///home/me/infra?rev=0123456789abcdef0123456789abcdef01234567", False),
    ],
)
def test_a_host_of_an_earlier_release_fetches_only_what_is_not_on_the_deployer(url: str, fetched: bool) -> None:
    assert host_fetches(url) is fetched
