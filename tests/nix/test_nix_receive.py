"""`nix-dabei receive` and the rebuild's wait for a sent flake source, as real processes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from dabei_firstboot import seed as seedlib

from .conftest import PROJECT, MetadataServer, write_config, write_fake_rebuild

SOURCE_ID = "0123456789abcdef0123456789abcdef"


def cli(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {"PYTHONPATH": str(PROJECT / "nix" / "firstboot"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "dabei_firstboot", "--config", str(config), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, env=env, check=False)


def archive(files: dict[str, bytes], extra: Any = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o444
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra)
    return buffer.getvalue()


def test_receive_unpacks_the_source_once_with_its_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = write_config(tmp_path, root)
    sent = archive({"flake.nix": b"{ outputs = _: {}; }\n", "hosts/web-1.nix": b"{ }\n", "build.sh": b"exit 0\n"})
    done = cli(config, "receive", "--source", SOURCE_ID, stdin=sent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"received": SOURCE_ID, "new": True}
    target = root / "var/lib/nix-dabei/flakes" / SOURCE_ID
    assert (target / "hosts/web-1.nix").read_bytes() == b"{ }\n"
    assert (target / "build.sh").stat().st_mode & 0o111, "the executable bit is part of the narHash"
    # The same id again: kept as it is (the id names the content).
    again = cli(config, "receive", "--source", SOURCE_ID, stdin=archive({"flake.nix": b"other"}))
    assert again.returncode == 0 and json.loads(again.stdout)["new"] is False
    assert (target / "flake.nix").read_bytes() == b"{ outputs = _: {}; }\n"


def test_receive_refuses_a_bad_id_and_links_out_of_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = write_config(tmp_path, root)
    bad = cli(config, "receive", "--source", "../etc", stdin=b"")
    assert bad.returncode == 2 and b"invalid source id" in bad.stderr
    link = tarfile.TarInfo("escape")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    refused = cli(config, "receive", "--source", SOURCE_ID, stdin=archive({"flake.nix": b"x"}, link))
    assert refused.returncode == 1
    flakes = root / "var/lib/nix-dabei/flakes"
    assert not (flakes / SOURCE_ID).exists() and list(flakes.iterdir()) == [], "nothing half-unpacked is left"


def seeded_host(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed: dict[str, Any], **overrides: Any
) -> tuple[Path, Path]:
    """A host root whose seed (with this flake) is applied, with a fake rebuild: (root, config)."""
    seedlib.write_seed(seed_disk, seed)
    root = tmp_path / "root"
    root.mkdir()
    rebuild = write_fake_rebuild(tmp_path / "fake-rebuild", 0)
    config = write_config(
        tmp_path,
        root,
        metadata_url=metadata_server.url,
        seed_device=str(seed_disk),
        rebuild_command=[str(rebuild), str(root), "{flake}", "{hostname}"],
        **overrides,
    )
    assert cli(config, "seed").returncode == 0
    return root, config


def test_a_rebuild_waits_for_the_sent_source_then_builds_it(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    flake = f"path:/var/lib/nix-dabei/flakes/{SOURCE_ID}?narHash=sha256-abc"
    root, config = seeded_host(tmp_path, metadata_server, seed_disk, {**seed_doc, "flake": flake})
    sender = threading.Timer(1.5, lambda: cli(config, "receive", "--source", SOURCE_ID, stdin=archive({"a": b"b"})))
    started = time.monotonic()
    sender.start()
    try:
        done = cli(config, "firstboot")
    finally:
        sender.join()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 1.5, "the rebuild waited for the source"
    status = json.loads((root / "var/lib/nix-dabei/status.json").read_text())
    assert status["phase"] == "converged" and status["flake"] == flake
    log = (root / "var/log/nix-dabei/firstboot.log").read_text()
    assert "waiting up to 1800 s for the deployer to send the flake source" in log


def test_a_source_never_sent_fails_the_rebuild_naming_it(
    tmp_path: Path, metadata_server: MetadataServer, seed_disk: Path, seed_doc: dict[str, Any]
) -> None:
    seed = {**seed_doc, "flake": f"path:/var/lib/nix-dabei/flakes/{SOURCE_ID}"}
    root, config = seeded_host(tmp_path, metadata_server, seed_disk, seed, source_wait_seconds=1)
    done = cli(config, "firstboot")
    assert done.returncode == 1
    status = json.loads((root / "var/lib/nix-dabei/status.json").read_text())
    assert (
        status["phase"] == "failed" and f"the flake source {SOURCE_ID} was not sent within 1 s" in status["last_error"]
    )
    assert not (root / "run/current-system").exists()


def stored_source(tmp_path: Path, text: str) -> str:
    """A source in this machine's Nix store (what the deployer holds of a flake input)."""
    source = tmp_path / "input" / "source"
    source.mkdir(parents=True)
    (source / "default.nix").write_text(text)
    done = subprocess.run(["nix-store", "--add-fixed", "--recursive", "sha256", str(source)], capture_output=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def test_receive_inputs_imports_an_export_into_the_hosts_store_and_missing_names_what_it_lacks(
    tmp_path: Path,
) -> None:
    store = tmp_path / "host"  # the host's own Nix store (a chroot store, as the simulator gives a host)
    config = write_config(tmp_path, tmp_path / "root", nix_store_command=["nix-store", "--store", str(store)])
    path = stored_source(tmp_path, '{ motd = "sent"; }\n')
    asked = cli(config, "receive", "--missing", path)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout) == [path]

    export = subprocess.run(["nix-store", "--export", path], capture_output=True, check=True).stdout
    compressed = subprocess.run(["zstd", "-c", "-q"], input=export, capture_output=True, check=True).stdout
    done = cli(config, "receive", "--inputs", stdin=compressed)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"imported": [path]}
    assert (store / path.lstrip("/") / "default.nix").read_text() == '{ motd = "sent"; }\n'
    assert json.loads(cli(config, "receive", "--missing", path).stdout) == []


def test_receive_refuses_what_is_not_a_store_path_and_a_broken_stream(tmp_path: Path) -> None:
    store = tmp_path / "host"
    config = write_config(tmp_path, tmp_path / "root", nix_store_command=["nix-store", "--store", str(store)])
    refused = cli(config, "receive", "--missing", "/etc/passwd", "/nix/store/x; rm -rf /")
    assert refused.returncode == 2
    assert b"not store paths: '/etc/passwd', '/nix/store/x; rm -rf /'" in refused.stderr
    broken = cli(config, "receive", "--inputs", stdin=b"not zstd")
    assert broken.returncode == 1
    assert b"importing the flake inputs failed" in broken.stderr
    assert [p for p in (store / "nix" / "store").glob("*") if not p.name.startswith(".")] == []
