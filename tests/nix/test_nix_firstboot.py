"""The first-boot program as a real process: seed disk file, local HTTP metadata server, fake rebuild."""

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

from .conftest import PROJECT, MetadataServer, older_layout, run_cli, write_config, write_fake_rebuild


def setup_host(tmp_path: Path, server: MetadataServer, disk: Path, failures: int = 0, **config: Any) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    rebuild = write_fake_rebuild(tmp_path / "fake-rebuild", failures)
    return write_config(
        tmp_path,
        root,
        metadata_url=server.url,
        seed_device=str(disk),
        rebuild_command=[str(rebuild), str(root), "{flake}", "{hostname}"],
        **config,
    )


def status_of(root: Path) -> dict[str, Any]:
    return json.loads((root / "var/lib/nix-dabei/status.json").read_text())


def test_seed_then_firstboot_converges(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    root = tmp_path / "root"

    seeded = run_cli(config, "seed")
    assert seeded.returncode == 0, seeded.stderr
    key = root / "var/lib/nix-dabei/ssh/ssh_host_ed25519_key"
    assert key.read_text().strip() == seed_doc["host_key"]["private"].strip()
    assert key.stat().st_mode & 0o777 == 0o600
    assert (root / "var/lib/nix-dabei/ssh/ssh_host_ed25519_key.pub").read_text().strip() == seed_doc["host_key"][
        "public"
    ]
    keys = root / "var/lib/nix-dabei/ssh/authorized_keys.d/root"
    assert keys.read_text().splitlines() == seed_doc["authorized_keys"]
    assert keys.stat().st_mode & 0o777 == 0o600
    assert (root / "var/lib/nix-dabei/flake").read_text().strip() == "github:example/hosts"
    assert (root / "var/lib/nix-dabei/pending").exists()
    assert status_of(root)["phase"] == "seed"
    # Applied means wiped: the partition is zeros, and a second run is a no-op.
    offset, size = seedlib.find_seed_partition(seed_disk)
    with open(seed_disk, "rb") as handle:
        handle.seek(offset)
        assert not any(handle.read(size))
    again = run_cli(config, "seed")
    assert again.returncode == 0 and "already applied" in again.stderr
    # The private key never reaches the logs.
    marker = seed_doc["host_key"]["private"].strip().splitlines()[1]
    assert marker not in seeded.stderr + seeded.stdout
    assert marker not in (root / "var/log/nix-dabei/firstboot.log").read_text()
    assert marker not in (root / "var/lib/nix-dabei/seed.json").read_text()

    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    status = status_of(root)
    assert status["phase"] == "converged"
    assert status["attempt"] == 1 and status["max_attempts"] == 3
    assert status["hostname"] == "installer-test" and status["flake"] == "github:example/hosts"
    assert status["system"].endswith("abc-nixos-system-installer-test")
    assert status["last_error"] is None and status["finished_at"] is not None
    assert status["boot_id"] == "0f7c5e0e-5b6b-4a57-9d39-2f7d3c1b6a11"
    assert not (root / "var/lib/nix-dabei/pending").exists()
    for path in ("run/nix-dabei/instance-data.json", "var/lib/nix-dabei/instance-data.json"):
        data = json.loads((root / path).read_text())
        assert data["mac_address"] == "96:00:01:79:bc:40"
        assert data["ipv6"]["address"] == "2a01:4f8:c0c:7bc5::1"
    network = (root / "run/systemd/network/10-nix-dabei-uplink.network").read_text()
    assert "MACAddress=96:00:01:79:bc:40" in network
    assert "Address=2a01:4f8:c0c:7bc5::1/64" in network
    assert "Gateway=fe80::1" in network and "DHCP=ipv4" in network
    assert "Name=" not in network  # never an interface name

    # Without the marker nothing runs again, even though the hostname is unchanged.
    rerun = run_cli(config, "firstboot")
    assert rerun.returncode == 0 and "nothing to do" in rerun.stderr
    assert (tmp_path / "root/rebuild-count").read_text().strip() == "1"

    report = json.loads(run_cli(config, "status").stdout)
    assert report["status"]["phase"] == "converged"
    assert report["system"] == status["system"]
    assert report["journal"] is None
    assert report["boot_id"] == "0f7c5e0e-5b6b-4a57-9d39-2f7d3c1b6a11"


def test_older_layout_with_eth0_alias(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.document = older_layout()
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "root"
    assert status_of(root)["hostname"] == "web-2"
    network = (root / "run/systemd/network/10-nix-dabei-uplink.network").read_text()
    assert "MACAddress=96:00:00:2b:1c:9e" in network
    assert "Address=2a01:4f9:c010:8a3c::1/64" in network and "Gateway=fe80::1" in network


def test_metadata_outage_then_recovery(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.drop_first = 2
    metadata_server.fail_first = 4
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, metadata_retries=6)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    assert metadata_server.requests == 5
    assert "HTTP 503" in result.stderr
    assert status_of(tmp_path / "root")["phase"] == "converged"


def test_slow_metadata_answer_is_retried(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.slow_first = 1
    metadata_server.slow_seconds = 3
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, metadata_timeout_seconds=1)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    assert "timed out" in result.stderr
    assert metadata_server.requests == 2


def test_metadata_never_answers_fails_clearly(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.fail_first = 1000
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot", timeout=60)
    assert result.returncode == 1
    status = status_of(tmp_path / "root")
    assert status["phase"] == "failed"
    assert "unavailable after 3 attempts" in status["last_error"] and "HTTP 503" in status["last_error"]
    assert metadata_server.requests == 3
    assert (tmp_path / "root/var/lib/nix-dabei/pending").exists()


def test_metadata_without_network_config_fails_clearly(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.document = "hostname: lonely\ninstance-id: 1\n"
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, metadata_retries=2)
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot").returncode == 1
    assert "network-config" in status_of(tmp_path / "root")["last_error"]
    assert metadata_server.requests == 1  # a well-formed answer is not an outage: not asked again


def test_server_without_public_network_fails_at_once(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    metadata_server.document = {"hostname": "private-only", "network-config": {"version": 1, "config": []}}
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, metadata_retries=5, metadata_backoff_seconds=2)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot", timeout=60)
    assert result.returncode == 1
    status = status_of(tmp_path / "root")
    assert status["phase"] == "failed"
    assert "'network-config.config': lists no network interface" in status["last_error"]
    assert metadata_server.requests == 1
    assert (tmp_path / "root/var/lib/nix-dabei/pending").exists()


def test_gateway_with_zone_gets_a_default_route(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """The older layout with `gateway: fe80::1%enp1s0` (networkd ignores a Gateway= with a zone)."""
    meta = older_layout()
    meta["hostname"] = "web-2.example.com"
    meta["network-config"]["config"][1]["subnets"][0]["routes"][0]["gateway"] = "fe80::1%enp1s0"
    metadata_server.document = meta
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "root"
    network = (root / "run/systemd/network/10-nix-dabei-uplink.network").read_text()
    assert "\nGateway=fe80::1\n" in network and "%" not in network
    data = json.loads((root / "var/lib/nix-dabei/instance-data.json").read_text())
    assert (data["hostname"], data["host_name"], data["domain"]) == ("web-2.example.com", "web-2", "example.com")
    # The flake attribute is the server's full name, as named in nixosConfigurations.
    assert (root / "run/current-system").resolve().name == "abc-nixos-system-web-2.example.com"


def test_rebuild_fails_twice_then_succeeds(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, failures=2)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot")
    assert result.returncode == 0, result.stderr
    status = status_of(tmp_path / "root")
    assert status["phase"] == "converged"
    assert status["attempt"] == 3 and status["max_attempts"] == 3
    assert status["last_error"] is None
    assert "rebuild attempt 2/3" in result.stderr


def test_rebuild_always_fails(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, failures=1000)
    assert run_cli(config, "seed").returncode == 0
    result = run_cli(config, "firstboot", timeout=60)
    assert result.returncode == 1
    root = tmp_path / "root"
    status = status_of(root)
    assert status["phase"] == "failed" and status["attempt"] == 3
    assert "rebuild failed 3 times" in status["last_error"]
    assert "exit 1" in status["last_error"] and "builder for" in status["last_error"]
    assert status["system"] is None and status["finished_at"] is not None
    assert (root / "rebuild-count").read_text().strip() == "3"
    assert (root / "var/lib/nix-dabei/pending").exists()
    report = json.loads(run_cli(config, "status").stdout)
    assert report["status"]["phase"] == "failed"
    assert "builder for" in report["journal"]


def test_rebuild_timeout_kills_the_attempt(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\necho started\nexec sleep 600\n")
    hang.chmod(0o755)
    config = setup_host(tmp_path, metadata_server, seed_disk, rebuild_retries=1, rebuild_timeout_seconds=1)
    raw = json.loads(config.read_text()) | {"rebuild_command": [str(hang), "{flake}"]}
    config.write_text(json.dumps(raw))
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot", timeout=60).returncode == 1
    assert "timed out after 1s" in status_of(tmp_path / "root")["last_error"]


def test_apply_switches_flake(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot").returncode == 0
    requests = metadata_server.requests
    result = run_cli(config, "apply", "--flake", "github:example/hosts/v2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"]["phase"] == "converged"
    assert report["status"]["flake"] == "github:example/hosts/v2"
    assert metadata_server.requests == requests  # the persisted instance data is reused
    assert (tmp_path / "root/var/lib/nix-dabei/flake").read_text().strip() == "github:example/hosts/v2"
    bad = run_cli(config, "apply", "--flake", "two words")
    assert bad.returncode == 2 and "invalid flake reference" in bad.stderr


def test_network_command_rewrites_runtime_file(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot").returncode == 0
    runtime = tmp_path / "root/run"
    (runtime / "systemd/network/10-nix-dabei-uplink.network").unlink()
    (runtime / "nix-dabei/instance-data.json").unlink()
    assert run_cli(config, "network").returncode == 0
    assert "MACAddress=96:00:01:79:bc:40" in (runtime / "systemd/network/10-nix-dabei-uplink.network").read_text()


def test_seed_without_seed_fails_into_status(tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path) -> None:
    config = setup_host(tmp_path, metadata_server, seed_disk)
    result = run_cli(config, "seed")
    assert result.returncode == 1
    status = status_of(tmp_path / "root")
    assert status["phase"] == "failed" and "no seed was ever applied" in status["last_error"]


def test_bad_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"metadata_retries": 0}))
    result = run_cli(config, "status")
    assert result.returncode == 2
    assert str(config) in result.stderr and "'metadata_retries'" in result.stderr
    config.write_text(json.dumps({"rebuild_comand": ["x"]}))
    result = run_cli(config, "status")
    assert result.returncode == 2 and "unknown configuration keys ['rebuild_comand']" in result.stderr


def test_seed_read_survives_a_torn_partition_table(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """A GPT read while another writer rewrites it (its CRC does not match for a moment) is read again."""
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    with open(seed_disk, "r+b") as handle:
        handle.seek(512)
        header = handle.read(92)
        handle.seek(512 + 40)
        handle.write(b"\xff")  # the header's CRC no longer matches
    process = subprocess.Popen(
        [sys.executable, "-m", "dabei_firstboot", "--config", str(config), "seed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(PROJECT / "nix" / "firstboot")),
    )
    time.sleep(1.2)
    with open(seed_disk, "r+b") as handle:
        handle.seek(512)
        handle.write(header)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "checksum mismatch" in stderr and "trying again" in stderr
    assert (tmp_path / "root/var/lib/nix-dabei/pending").exists()


def test_failed_wipe_is_done_on_the_next_boot(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """The seed is applied and recorded, the wipe fails (read-only device): the next boot finds the same
    seed, only wipes it, and does not start another first boot."""
    seedlib.write_seed(seed_disk, seed_doc)
    readonly = subprocess.run(
        ["losetup", "--read-only", "-f", "--show", str(seed_disk)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        config = setup_host(tmp_path, metadata_server, seed_disk)
        config.write_text(json.dumps(json.loads(config.read_text()) | {"seed_device": readonly}))
        first = run_cli(config, "seed")
    finally:
        subprocess.run(["losetup", "-d", readonly], check=True)
    root = tmp_path / "root"
    assert first.returncode == 1
    assert "wiping the seed failed (the next boot tries again)" in first.stderr
    assert (root / "var/lib/nix-dabei/ssh/ssh_host_ed25519_key").exists()
    assert seedlib.read_seed(seed_disk) == seed_doc  # the private key is still on the disk
    (root / "var/lib/nix-dabei/pending").unlink()  # the first boot converged meanwhile
    config.write_text(json.dumps(json.loads(config.read_text()) | {"seed_device": str(seed_disk)}))
    second = run_cli(config, "seed")
    assert second.returncode == 0, second.stderr
    assert "applied before but not wiped; wiping it now" in second.stderr
    with pytest.raises(seedlib.SeedEmpty):
        seedlib.read_seed(seed_disk)
    assert not (root / "var/lib/nix-dabei/pending").exists()


def _exit4_rebuild(path: Path, root: Path, code: int, message: str) -> Path:
    """A rebuild that switches (links run/current-system) and then reports failed units like
    switch-to-configuration does, exiting ``code``."""
    path.write_text(
        f"""#!/bin/sh
mkdir -p "{root}/run" "{root}/nix/store/abc-nixos-system-$2"
ln -sfn "{root}/nix/store/abc-nixos-system-$2" "{root}/run/current-system"
echo "warning: the following units failed: nginx.service, acme-example.service" >&2
echo "{message}" >&2
exit {code}
"""
    )
    path.chmod(0o755)
    return path


def test_switch_with_failed_units_converges_naming_them(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """Exit 4 of switch-to-configuration (passed on by the Bash nixos-rebuild, reported by nixos-rebuild-ng
    as exit 1 with its message) means switched with failed units: converged, not retried."""
    for code, message in [
        (4, ""),
        (1, "Command 'systemd-run --unit=nixos-rebuild-switch-to-configuration /nix/store/x/bin/"
            "switch-to-configuration switch' returned non-zero exit status 4."),
    ]:  # fmt: skip
        case = tmp_path / f"exit{code}"
        case.mkdir()
        seedlib.write_seed(seed_disk, seed_doc)
        config = setup_host(case, metadata_server, seed_disk)
        root = case / "root"
        rebuild = _exit4_rebuild(case / "rebuild", root, code, message)
        config.write_text(
            json.dumps(json.loads(config.read_text()) | {"rebuild_command": [str(rebuild), "{flake}", "{hostname}"]})
        )
        assert run_cli(config, "seed").returncode == 0
        result = run_cli(config, "firstboot")
        assert result.returncode == 0, result.stderr
        status = status_of(root)
        assert status["phase"] == "converged" and status["attempt"] == 1
        assert status["failed_units"] == ["nginx.service", "acme-example.service"]
        assert status["system"].endswith("abc-nixos-system-installer-test")
        assert not (root / "var/lib/nix-dabei/pending").exists()


def test_other_failures_are_still_retried(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """Exit 1 without the exit-4 message is a failed rebuild; before every attempt the program waits for a
    switch an earlier attempt may have left running (switch_wait_command)."""
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk, failures=1000)
    waits = tmp_path / "waits"
    wait = tmp_path / "wait"
    wait.write_text(f"#!/bin/sh\necho waited >> {waits}\n")
    wait.chmod(0o755)
    config.write_text(json.dumps(json.loads(config.read_text()) | {"switch_wait_command": [str(wait)]}))
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot", timeout=60).returncode == 1
    status = status_of(tmp_path / "root")
    assert status["phase"] == "failed" and status["attempt"] == 3 and status["failed_units"] == []
    assert waits.read_text().splitlines() == ["waited"] * 3


def test_later_boot_without_a_seed_partition_keeps_the_status(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    """The seed unit runs every boot: once a seed was applied, a disk without the seed partition (or one
    that cannot be read) is nothing to do, and does not turn a converged host's status into failed."""
    seedlib.write_seed(seed_disk, seed_doc)
    config = setup_host(tmp_path, metadata_server, seed_disk)
    assert run_cli(config, "seed").returncode == 0
    assert run_cli(config, "firstboot").returncode == 0
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1024 * 1024))
    config.write_text(json.dumps(json.loads(config.read_text()) | {"seed_device": str(plain)}))
    result = run_cli(config, "seed")
    assert result.returncode == 0, result.stderr
    assert "no seed partition to check" in result.stderr
    assert "trying again" not in result.stderr  # read once, not retried as on the first boot
    assert status_of(tmp_path / "root")["phase"] == "converged"
