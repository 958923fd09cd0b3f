"""The machine side of the simulator: real sshd in namespaces, real loop devices, real first-boot program."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml
from aiohttp import web
from dabei_firstboot.grow import PARTITION_NAME as POOL
from dabei_firstboot.seed import PARTITION_NAME, SeedEmpty, read_seed, write_seed

from dabei_component.demo import write_fixture_flake
from dabei_component.sim.client import free_port
from dabei_component.sim.fake_rebuild import SIM_STATE
from dabei_component.sim.machine import Machine, MachineSpec, SshFaults

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DISK_BYTES = 64 * 1024 * 1024
# 127.77.200.x: clear of the API's own address allocation (127.77.X.Y from low numbers).
_addresses = itertools.count(1)


def next_address() -> str:
    return f"127.77.200.{next(_addresses) % 250 + 1}"


def host_dev_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f if line.split()[4].startswith("/dev"))


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def loop_devices_of(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True, check=True).stdout


def assert_nothing_running(machine: Machine) -> None:
    assert machine.mode == "off"
    assert loop_devices_of(machine.disk_path) == ""
    assert str(machine.disk_path) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert processes_mentioning(str(machine.state_dir)) == []


@pytest.fixture
def client_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def make_spec(tmp_path: Path, *, name: str = "web-1", metadata_url: str = "http://127.0.0.1:9/none") -> MachineSpec:
    address = next_address()
    return MachineSpec(
        server_id=int(address.rsplit(".", 1)[1]),
        name=name,
        ipv4=address,
        ipv6_address="2001:db8:5::1",
        mac="96:00:00:00:00:05",
        disk_bytes=DISK_BYTES,
        state_dir=tmp_path / "server",
        metadata_url=metadata_url,
    )


@pytest.fixture
async def machine(tmp_path: Path) -> AsyncIterator[Machine]:
    spec = make_spec(tmp_path)
    m = Machine(spec, ssh_port=free_port(spec.ipv4))
    try:
        yield m
    finally:
        await m.destroy()
    assert_nothing_running(m)
    assert not spec.state_dir.exists()


async def connect(machine: Machine, key: asyncssh.SSHKey, **kwargs: Any) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {"known_hosts": None, "client_keys": [key]}
    options.update(kwargs)
    return await asyncssh.connect(machine.spec.ipv4, machine.ssh_port, username="root", connect_timeout=20, **options)


async def run(machine: Machine, key: asyncssh.SSHKey, command: str, **kwargs: Any) -> asyncssh.SSHCompletedProcess:
    async with await connect(machine, key, **kwargs) as conn:
        result = await conn.run(command, check=True)
    return result


async def host_key_of(machine: Machine, key: asyncssh.SSHKey) -> str:
    async with await connect(machine, key) as conn:
        server_key = conn.get_server_host_key()
    assert server_key is not None
    return server_key.export_public_key().decode().strip()


async def wait_for_ssh(machine: Machine, key: asyncssh.SSHKey, deadline_seconds: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    while True:
        try:
            await run(machine, key, "true")
            return
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


# --- rescue ------------------------------------------------------------------------------------------------


async def test_rescue_is_a_real_sshd_with_the_disk_at_dev_sda(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    host_dev_before = host_dev_mounts()
    await machine.boot_rescue([public_line(client_key)])
    details = machine.describe()
    assert details["mode"] == "rescue" and details["disk_backing"] == "loop"
    assert details["loop_device"] and str(machine.disk_path) in loop_devices_of(machine.disk_path)
    assert details["ssh_proxy"] is False
    private_key = (machine.state_dir / "rescue/ssh_host_ed25519_key").read_text()
    assert "PRIVATE KEY" in private_key and private_key.splitlines()[1] not in json.dumps(details)
    assert machine.disk_path.stat().st_size == DISK_BYTES
    assert machine.disk_path.stat().st_blocks == 0  # sparse

    result = await run(
        machine,
        client_key,
        "hostname; blockdev --getsize64 /dev/sda; command -v bash zstd dd blkdiscard sha256sum sync | wc -l;"
        " cat /proc/sys/kernel/random/boot_id",
    )
    assert str(result.stdout).split() == ["rescue", str(DISK_BYTES), "6", machine.boot_id]

    # The component's write path: compressed stream -> zstd -d | dd onto the disk, then sha256 on the host.
    payload = os.urandom(3 * 1024 * 1024 + 512)
    compressed = subprocess.run(["zstd", "-q", "-c"], input=payload, capture_output=True, check=True).stdout
    async with await connect(machine, client_key) as conn:
        await conn.run(
            "zstd -d | dd of=/dev/sda bs=4M conv=sparse status=none && sync",
            input=compressed,
            encoding=None,
            check=True,
        )
        digest = await conn.run(f"head -c {len(payload)} /dev/sda | sha256sum", check=True)
    with open(machine.disk_path, "rb") as f:
        assert f.read(len(payload)) == payload
    assert str(digest.stdout).split()[0] == hashlib.sha256(payload).hexdigest()

    assert not Path("/dev/sda").exists()
    assert host_dev_mounts() == host_dev_before
    await machine.halt()
    assert_nothing_running(machine)
    assert machine.disk_path.exists()  # the disk outlives a halt


async def test_rescue_admits_only_the_given_keys(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    await machine.boot_rescue([public_line(client_key)])
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(machine, stranger)
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(machine, client_key, client_keys=None, password="root")


async def test_every_rescue_boot_has_a_new_host_key_and_boot_id(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    await machine.boot_rescue([public_line(client_key)])
    first_key, first_boot = await host_key_of(machine, client_key), machine.boot_id
    await run(machine, client_key, "printf kept | dd of=/dev/sda conv=notrunc status=none")
    await machine.boot_rescue([public_line(client_key)])
    assert await host_key_of(machine, client_key) != first_key
    assert machine.boot_id != first_boot
    # Same disk across boots.
    assert str((await run(machine, client_key, "head -c 4 /dev/sda")).stdout) == "kept"


async def test_concurrent_rescue_boots_get_distinct_loop_devices(tmp_path: Path, client_key: asyncssh.SSHKey) -> None:
    machines = []
    for i in range(4):
        spec = make_spec(tmp_path / str(i))
        machines.append(Machine(spec, ssh_port=free_port(spec.ipv4)))
    try:
        await asyncio.gather(*(m.boot_rescue([public_line(client_key)]) for m in machines))
        devices = {m.describe()["loop_device"] for m in machines}
        assert len(devices) == 4 and None not in devices
        for index, m in enumerate(machines):
            await run(m, client_key, f"printf disk{index} | dd of=/dev/sda conv=notrunc status=none")
        for index, m in enumerate(machines):
            assert m.disk_path.read_bytes()[:5] == f"disk{index}".encode()
    finally:
        await asyncio.gather(*(m.destroy() for m in machines))
    for m in machines:
        assert_nothing_running(m)


async def test_without_loop_devices_dev_sda_is_the_plain_file(
    machine: Machine, client_key: asyncssh.SSHKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "losetup").write_text("#!/bin/sh\necho 'losetup: cannot find an unused loop device' >&2\nexit 1\n")
    (fake_bin / "losetup").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    await machine.boot_rescue([public_line(client_key)])
    details = machine.describe()
    assert details["loop_device"] is None
    assert details["disk_backing"].startswith("plain file (losetup failed: losetup: cannot find")
    await run(machine, client_key, "printf plain | dd of=/dev/sda conv=notrunc status=none")
    assert machine.disk_path.read_bytes()[:5] == b"plain"
    assert machine.disk_path.stat().st_size == DISK_BYTES


async def test_authorized_keys_are_checked(machine: Machine) -> None:
    with pytest.raises(ValueError, match=r"authorized_keys\[1\]"):
        await machine.boot_rescue(["ssh-ed25519 AAAA a", "two\nlines"])
    assert machine.mode == "off"


# --- SSH faults --------------------------------------------------------------------------------------------


def test_set_faults_names_the_bad_key_or_value() -> None:
    faults = SshFaults()
    with pytest.raises(ValueError, match="'drop_after'"):
        faults.set_faults({"drop_after": 10})
    with pytest.raises(ValueError, match="'drop_after_bytes'"):
        faults.set_faults({"not_rescue": True, "drop_after_bytes": "many"})
    assert faults.not_rescue is False  # nothing applied from a rejected dict
    with pytest.raises(ValueError, match="'refuse_for_seconds'"):
        faults.set_faults({"refuse_for_seconds": -1})
    with pytest.raises(ValueError, match="'boot_hook_fails'"):
        faults.set_faults({"boot_hook_fails": 1})
    with pytest.raises(ValueError, match="'change_host_key_after_connections'"):
        faults.set_faults({"change_host_key_after_connections": 1.5})
    faults.set_faults({"drop_after_bytes": 4096, "refuse_for_seconds": 2})
    assert faults.to_dict() == {
        "refuse_for_seconds": 2.0,
        "drop_after_bytes": 4096,
        "not_rescue": False,
        "change_host_key_after_connections": None,
        "boot_hook_fails": False,
        "drop_relays_after_bytes": None,
    }
    with pytest.raises(ValueError, match="'drop_relays_after_bytes'"):
        faults.set_faults({"drop_relays_after_bytes": -3})
    faults.set_faults({"drop_after_bytes": None})
    assert faults.drop_after_bytes is None


async def test_refuse_for_seconds_then_sshd_comes_up(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    machine.set_faults({"refuse_for_seconds": 3})
    await machine.boot_rescue([public_line(client_key)])
    assert machine.faults.refuse_for_seconds == 0  # used up by this boot
    with pytest.raises(ConnectionRefusedError):
        await connect(machine, client_key)
    await wait_for_ssh(machine, client_key)
    assert str((await run(machine, client_key, "hostname")).stdout).strip() == "rescue"


async def test_halt_during_refusal_starts_nothing(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    machine.set_faults({"refuse_for_seconds": 1})
    await machine.boot_rescue([public_line(client_key)])
    await machine.halt()
    await asyncio.sleep(1.5)
    assert machine.sshd_pid is None
    assert_nothing_running(machine)


async def test_drop_after_bytes_cuts_connections(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    machine.set_faults({"drop_after_bytes": 64 * 1024})
    await machine.boot_rescue([public_line(client_key)])
    assert machine.describe()["ssh_proxy"] is True
    # Small sessions pass through the proxy unharmed.
    assert str((await run(machine, client_key, "hostname")).stdout).strip() == "rescue"
    payload = os.urandom(512 * 1024)
    async with await connect(machine, client_key) as conn:
        try:
            result = await conn.run("dd of=/dev/sda bs=64k status=none", input=payload, encoding=None)
            # The session ended without an exit status: the connection was cut under it.
            assert result.exit_status is None
        except (asyncssh.Error, OSError):
            pass
        with pytest.raises((asyncssh.Error, OSError)):
            await conn.run("true")
    assert machine.disk_path.read_bytes()[: len(payload)] != payload
    machine.set_faults({"drop_after_bytes": None})
    await machine.boot_rescue([public_line(client_key)])
    assert machine.describe()["ssh_proxy"] is False


async def test_not_rescue_answers_as_a_normal_system_once(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    machine.set_faults({"not_rescue": True})
    await machine.boot_rescue([public_line(client_key)])
    assert machine.describe()["loop_device"] is None
    result = await run(machine, client_key, "hostname; test -e /dev/sda && echo has-sda || echo no-sda")
    assert str(result.stdout).split() == [machine.spec.name, "no-sda"]
    assert machine.faults.not_rescue is False
    await machine.boot_rescue([public_line(client_key)])
    assert str((await run(machine, client_key, "hostname")).stdout).strip() == "rescue"


async def test_host_key_changes_after_n_connections(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    machine.set_faults({"change_host_key_after_connections": 2})
    await machine.boot_rescue([public_line(client_key)])
    async with await connect(machine, client_key) as first:
        original = first.get_server_host_key()
        assert original is not None
        original_line = original.export_public_key().decode().strip()
        assert await host_key_of(machine, client_key) == original_line  # connection 2
        changed = await host_key_of(machine, client_key)  # connection 3
        assert changed != original_line
        assert await host_key_of(machine, client_key) == changed
        # A session opened before the change carries on.
        assert str((await first.run("hostname", check=True)).stdout).strip() == "rescue"


async def test_boot_hook_fails_leaves_ssh_refused(machine: Machine, client_key: asyncssh.SSHKey) -> None:
    calls: list[str] = []

    async def hook(m: Machine) -> None:
        calls.append(m.boot_id)

    machine.boot_hook = hook
    machine.set_faults({"boot_hook_fails": True})
    await machine.boot_disk()
    assert calls == [] and machine.mode == "disk"
    assert "boot_hook_fails" in machine.describe()["boot_error"]
    with pytest.raises(ConnectionRefusedError):
        await connect(machine, client_key)
    machine.set_faults({"boot_hook_fails": False})
    await machine.boot_disk()
    assert calls == [machine.boot_id]


# --- installed system (disk boot) ----------------------------------------------------------------------------


@pytest.fixture
async def metadata_url() -> AsyncIterator[str]:
    """A metadata service in the shape of Hetzner's, for the machine of `installed` (hostname web-1)."""
    fixture = json.loads((SHARED / "fixtures" / "hetzner-metadata.json").read_text())
    fixture["hostname"] = "web-1"

    async def metadata(request: web.Request) -> web.Response:
        return web.Response(text=yaml.safe_dump(fixture), content_type="text/yaml")

    app = web.Application()
    app.router.add_get("/hetzner/v1/metadata", metadata)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port("127.0.0.1")
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hetzner/v1/metadata"
    finally:
        await runner.cleanup()


def partition_disk(disk: Path) -> None:
    subprocess.run(
        # The seed partition, then the pool's partition by the name `nix-dabei grow` looks for.
        [
            "sgdisk",
            "--new=1:2048:+1M",
            f"--change-name=1:{PARTITION_NAME}",
            "--new=2:0:0",
            f"--change-name=2:{POOL}",
            str(disk),
        ],
        check=True,
        capture_output=True,
    )


def seed_doc(host_key: asyncssh.SSHKey, client_key: asyncssh.SSHKey, flake: str) -> dict[str, Any]:
    return {
        "flake": flake,
        "hostname": "web-1",
        "host_key": {
            "type": "ssh-ed25519",
            "private": host_key.export_private_key("openssh").decode(),
            "public": public_line(host_key),
        },
        "authorized_keys": [public_line(client_key)],
    }


@pytest.fixture
async def installed(tmp_path: Path, metadata_url: str) -> AsyncIterator[Machine]:
    spec = make_spec(tmp_path, metadata_url=metadata_url)
    m = Machine(spec, ssh_port=free_port(spec.ipv4))
    m.disk.ensure()
    try:
        yield m
    finally:
        await m.destroy()
    assert_nothing_running(m)


async def status_over_ssh(machine: Machine, key: asyncssh.SSHKey, known_hosts: Any) -> dict[str, Any]:
    result = await run(machine, key, "nix-dabei status", known_hosts=known_hosts)
    status: dict[str, Any] = json.loads(str(result.stdout))
    return status


async def wait_for_phase(machine: Machine, key: asyncssh.SSHKey, known_hosts: Any, phases: set[str]) -> dict[str, Any]:
    for _ in range(300):
        status = await status_over_ssh(machine, key, known_hosts)
        if status["status"] and status["status"]["phase"] in phases:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"phase never reached {phases}: {status}")


async def test_blank_disk_boots_nothing(installed: Machine, client_key: asyncssh.SSHKey) -> None:
    await installed.boot_disk()
    assert installed.mode == "disk"
    assert "no bootable system" in installed.describe()["boot_error"]
    with pytest.raises(ConnectionRefusedError):
        await connect(installed, client_key)


async def test_installed_system_applies_the_seed_and_converges(installed: Machine, client_key: asyncssh.SSHKey) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = asyncssh.import_known_hosts(f"{installed.spec.ipv4} {public_line(host_key)}\n")
    partition_disk(installed.disk_path)
    # The host's flake on its own disk, where the simulator keeps its records (they survive a reinstall).
    flake = f"path:/{SIM_STATE}/fleet"
    for suffix in ("", "-2"):
        write_fixture_flake(installed.rootfs / f"{SIM_STATE}/fleet{suffix}", {"web-1": "x86_64-linux"})
    write_seed(installed.disk_path, seed_doc(host_key, client_key, flake))

    await installed.boot_disk()
    assert installed.describe()["boot_error"] is None
    # Strict host key checking against the seed's key: the installed sshd uses it.
    result = await run(installed, client_key, "hostname; cat /proc/sys/kernel/random/boot_id", known_hosts=known_hosts)
    assert str(result.stdout).split() == ["web-1", installed.boot_id]
    status = await wait_for_phase(installed, client_key, known_hosts, {"converged", "failed"})
    assert status["status"]["phase"] == "converged", status
    assert status["boot_id"] == installed.boot_id
    system = status["system"]
    assert system.startswith("/nix/store/") and system.endswith("-nixos-system-web-1")
    assert (Path(system) / "settings.json").is_file(), "built by the real nix build"
    rebuilds = (installed.rootfs / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()
    assert rebuilds == [flake]
    with pytest.raises(SeedEmpty):
        read_seed(installed.disk_path)

    # A reboot: new boot id, same installed host key, no second rebuild.
    first_boot = installed.boot_id
    await installed.boot_disk()
    assert installed.boot_id != first_boot
    status = await status_over_ssh(installed, client_key, known_hosts)
    assert status["boot_id"] == installed.boot_id and status["status"]["phase"] == "converged"

    # A reinstall (new image and seed, new host key) starts from an empty root filesystem; the simulator's
    # records stay, and a failure counter set before the boot applies to the new system.
    (installed.rootfs / "var/lib/leftover").write_text("from the old system")
    fail_counter = installed.rootfs / "var/lib/nix-dabei-sim/fail-rebuilds"
    fail_counter.write_text("1\n")
    new_host_key = asyncssh.generate_private_key("ssh-ed25519")
    write_seed(installed.disk_path, seed_doc(new_host_key, client_key, flake + "-2"))
    await installed.boot_disk()
    new_known_hosts = asyncssh.import_known_hosts(f"{installed.spec.ipv4} {public_line(new_host_key)}\n")
    status = await wait_for_phase(installed, client_key, new_known_hosts, {"converged", "failed"})
    assert status["status"]["phase"] == "converged" and status["status"]["attempt"] == 2
    assert not (installed.rootfs / "var/lib/leftover").exists()
    assert int(fail_counter.read_text()) == 0
    rebuilds = (installed.rootfs / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()
    assert rebuilds == [flake, flake + "-2"]


async def test_failing_rebuilds_are_reported(installed: Machine, client_key: asyncssh.SSHKey) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = asyncssh.import_known_hosts(f"{installed.spec.ipv4} {public_line(host_key)}\n")
    partition_disk(installed.disk_path)
    write_seed(installed.disk_path, seed_doc(host_key, client_key, "path:/srv/fleet"))
    fail_counter = installed.rootfs / "var/lib/nix-dabei-sim/fail-rebuilds"
    fail_counter.parent.mkdir(parents=True)
    fail_counter.write_text("1000\n")

    await installed.boot_disk()
    status = await wait_for_phase(installed, client_key, known_hosts, {"converged", "failed"})
    assert status["status"]["phase"] == "failed"
    assert "simulated failure" in (status["journal"] or "")
    assert status["system"] is None
    assert int(fail_counter.read_text()) == 1000 - status["status"]["attempt"]


async def test_a_cax_server_does_not_boot_an_x86_64_image_as_the_hardware_would_not(
    tmp_path: Path, client_key: asyncssh.SSHKey
) -> None:
    """Why the preview refuses the pair: written anyway, the disk boots nothing, and nobody answers."""
    from dataclasses import replace

    from dabei_component.demo import FIXTURE_FLAKE
    from dabei_component.imaging import NIX_FEATURES, OFFLINE_NIX_ARGS

    spec = replace(make_spec(tmp_path, name="arm-1"), architecture="arm")
    arm = Machine(spec, ssh_port=free_port(spec.ipv4))
    try:
        arm.disk.ensure()
        built = {}
        for system in ("x86_64-linux", "aarch64-linux"):
            cmd = ["nix", *NIX_FEATURES, "build", "--no-link", "--json", *OFFLINE_NIX_ARGS]
            cmd += ["--option", "extra-platforms", "aarch64-linux", f"path:{FIXTURE_FLAKE}#packages.{system}.default"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            built[system] = Path(json.loads(done.stdout)[0]["outputs"]["out"]) / "nixos.img"
        image = built["x86_64-linux"].read_bytes()
        with open(arm.disk_path, "r+b") as disk:
            disk.write(image)
        await arm.boot_disk()
        error = arm.describe()["boot_error"]
        assert "boot loader is for i386-pc" in error and "arm server's firmware boots arm64-efi" in error
        with pytest.raises(ConnectionRefusedError):
            await connect(arm, client_key)
        # The aarch64 image gets past the firmware (to the installed system's own start-up).
        with open(arm.disk_path, "r+b") as disk:
            disk.write(built["aarch64-linux"].read_bytes())
        await arm.boot_disk()
        assert "firmware" not in (arm.describe()["boot_error"] or "")
    finally:
        await arm.destroy()
