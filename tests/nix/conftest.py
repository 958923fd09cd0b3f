"""Fixtures for the nix/ tests: a local metadata server, GPT disk files, configs and a fake rebuild."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dabei_component.imaging import NIX_FEATURES, OFFLINE_NIX_ARGS

PROJECT = Path(__file__).resolve().parents[2]
SHARED = PROJECT / ".." / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NIX_OPTIONS = [*OFFLINE_NIX_ARGS, *NIX_FEATURES]


def current_layout() -> dict[str, Any]:
    return json.loads((SHARED / "fixtures" / "hetzner-metadata.json").read_text())


def older_layout() -> dict[str, Any]:
    return yaml.safe_load((FIXTURES / "hetzner-metadata-eth0-0.yaml").read_text())


class MetadataServer:
    """Serves a metadata document as YAML at /hetzner/v1/metadata on 127.0.0.1.

    ``fail_first`` answers 503, ``drop_first`` closes the connection without an answer and
    ``slow_first`` waits ``slow_seconds`` before answering, each for the first N requests."""

    def __init__(self) -> None:
        self.document: dict[str, Any] | str = current_layout()
        self.fail_first = 0
        self.drop_first = 0
        self.slow_first = 0
        self.slow_seconds = 0.0
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                    number = server.requests
                if self.path != "/hetzner/v1/metadata":
                    self.send_error(404)
                    return
                if number <= server.drop_first:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if number <= server.fail_first:
                    self.send_error(503, "metadata service unavailable")
                    return
                if number <= server.slow_first:
                    time.sleep(server.slow_seconds)
                doc = server.document
                body = (doc if isinstance(doc, str) else yaml.safe_dump(doc)).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/yaml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hetzner/v1/metadata"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metadata_server() -> Iterator[MetadataServer]:
    server = MetadataServer()
    yield server
    server.close()


def make_gpt_disk(path: Path, size_mib: int = 16, seed_mib: int = 1) -> Path:
    """A disk file with the image's partition names, made by sgdisk."""
    with open(path, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    subprocess.run(
        [
            "sgdisk", "--clear",
            "--new=1:2048:+1M", "--typecode=1:EF02", "--change-name=1:bios-boot",
            "--new=2:0:+4M", "--typecode=2:EF00", "--change-name=2:ESP",
            f"--new=3:0:+{seed_mib}M", "--typecode=3:8300", "--change-name=3:dabei-seed",
            "--new=4:0:0", "--typecode=4:BF00", "--change-name=4:zfs",
            str(path),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return path


@pytest.fixture
def seed_disk(tmp_path: Path) -> Path:
    return make_gpt_disk(tmp_path / "disk.img")


@pytest.fixture(scope="session")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("hostkey")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f", str(directory / "key")],
        check=True,
    )
    return {
        "type": "ssh-ed25519",
        "private": (directory / "key").read_text(),
        "public": (directory / "key.pub").read_text().strip(),
    }


@pytest.fixture
def seed_doc(host_key: dict[str, str]) -> dict[str, Any]:
    return {
        "flake": "github:example/hosts",
        "hostname": "installer-test",
        "host_key": host_key,
        "authorized_keys": [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqHqkGqjvnS3VGr2bAJTD1i2Wn1wZz7Cq2r8b5UZkq3 ops@example",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM5hV0S7kq0x8GQ9y3oB0Qm6jS1vAn3cF2tVh7pZr4Lm ci@example",
        ],
    }


def write_fake_rebuild(path: Path, failures: int) -> Path:
    """A rebuild command that fails ``failures`` times, then links <root>/run/current-system."""
    script = f"""#!/bin/sh
# usage: fake-rebuild ROOT FLAKE HOSTNAME
root="$1"; count_file="$root/rebuild-count"
count=$(cat "$count_file" 2>/dev/null || echo 0); count=$((count + 1)); echo "$count" > "$count_file"
echo "building $2#$3 (attempt $count)"
if [ "$count" -le {failures} ]; then
  echo "error: builder for '/nix/store/xxx-etc.drv' failed with exit code 1" >&2
  exit 1
fi
mkdir -p "$root/run" "$root/nix/store/abc-nixos-system-$3"
ln -sfn "$root/nix/store/abc-nixos-system-$3" "$root/run/current-system"
echo "switched"
"""
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write_config(tmp_path: Path, root: Path, **overrides: Any) -> Path:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("0f7c5e0e-5b6b-4a57-9d39-2f7d3c1b6a11\n")
    config = {
        "root": str(root),
        "metadata_retries": 3,
        "metadata_backoff_seconds": 0.05,
        "metadata_backoff_max_seconds": 0.2,
        "metadata_timeout_seconds": 2,
        "rebuild_retries": 3,
        "rebuild_backoff_seconds": 0.05,
        "rebuild_timeout_seconds": 30,
        "boot_id_path": str(boot_id),
        "journal_command": None,
        "network_reload_command": None,
    } | overrides
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "nix" / "firstboot"))
    return subprocess.run(
        [sys.executable, "-m", "dabei_firstboot", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def nix_available() -> bool:
    return shutil.which("nix") is not None and shutil.which("nix-instantiate") is not None


def nix_eval(expr: str) -> Any:
    """The JSON value of a Nix expression (`nix-instantiate --eval --strict --json`)."""
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
