"""A real OpenSSH sshd on a loopback address and loop devices as target disks, for component tests.

conftest.py exposes the fixtures; test modules import the types and helpers from here.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dabei_component.keys import SshKeyPair, generate_ssh_keypair
from dabei_component.sim.client import free_port

SSHD = "/usr/sbin/sshd"


@dataclass
class SshdServer:
    """One sshd process serving root by key; `restart` can change its host key, like a rebooted host."""

    state_dir: Path
    address: str
    port: int
    client: SshKeyPair
    host: SshKeyPair
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        host_key_file = self.state_dir / "ssh_host_ed25519_key"
        host_key_file.write_text(self.host.private_openssh)
        host_key_file.chmod(0o600)
        authorized = self.state_dir / "authorized_keys"
        authorized.write_text(self.client.public + "\n")
        home = self.state_dir / "home"
        home.mkdir(exist_ok=True)
        config = self.state_dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:{self.port}",
                    f"HostKey {host_key_file}",
                    f"PidFile {self.state_dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "LogLevel ERROR",
                    # bash sources ~/.bashrc for commands run over SSH; this machine's root dotfiles are
                    # slow and can block (pyenv rehash locks), and a rescue system has none: use an empty home.
                    f"SetEnv HOME={home}",
                    "",
                ]
            )
        )
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.state_dir / "sshd.log", "ab"),  # noqa: SIM115 - owned by the child
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.state_dir / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {log}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.address}:{self.port} within 10s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, *, new_host_key: bool) -> None:
        self.stop()
        if new_host_key:
            self.host = generate_ssh_keypair()
        self.start()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshdServer]:
    address = f"127.78.{random.randint(0, 255)}.{random.randint(2, 254)}"
    server = SshdServer(
        state_dir=tmp_path / "sshd",
        address=address,
        port=free_port(address),
        client=generate_ssh_keypair(),
        host=generate_ssh_keypair(),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class LoopDevices:
    """Creates loop devices over sparse files and releases all of them at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def create(self, size: int, name: str = "disk") -> tuple[str, Path]:
        backing = self.directory / f"{name}-{len(self.devices)}.img"
        with open(backing, "wb") as handle:
            handle.truncate(size)
        device = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.devices.append(device)
        return device, backing

    def release(self) -> None:
        for device in reversed(self.devices):
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        self.devices.clear()


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[LoopDevices]:
    devices = LoopDevices(tmp_path)
    try:
        yield devices
    finally:
        devices.release()


def make_gpt_image(path: Path, size: int = 16 * 1024 * 1024, *, seed: bool = True, random_bytes: int = 0) -> Path:
    """A GPT disk image with a 1 MiB `dabei-seed` partition and some data in the root partition.

    `random_bytes` of incompressible data go after the first 12 MiB (the size must leave room).
    """
    with open(path, "wb") as handle:
        handle.truncate(size)
    name = "dabei-seed" if seed else "other"
    subprocess.run(
        ["sgdisk", "-o", "-n", "1:2048:+1M", "-c", f"1:{name}", "-n", "2:0:0", "-c", "2:root", str(path)],
        check=True,
        capture_output=True,
    )
    with open(path, "r+b") as handle:
        handle.seek(4 * 1024 * 1024)
        handle.write(b"nix store path contents\n" * 40000)
        handle.seek(9 * 1024 * 1024)
        handle.write(bytes(range(256)) * 2048)
        if random_bytes:
            handle.seek(12 * 1024 * 1024)
            handle.write(os.urandom(random_bytes))
    return path
