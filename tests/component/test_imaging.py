"""Image build (real nix build of a throwaway flake) and preparation (real zstd, cache, locking)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sshd_fixture import make_gpt_image

from dabei_component import imaging
from dabei_component.imaging import (
    OFFLINE_NIX_ARGS,
    ImageError,
    PreparedImage,
    build_image,
    find_image_file,
    prepare_image,
)

FLAKE = """
{
  outputs = { self }: {
    packages.x86_64-linux.image = builtins.derivation {
      name = "dabei-test-image";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" ''
        set -e
        /usr/bin/mkdir $out
        /usr/bin/truncate -s 8M $out/disk.img
        /usr/sbin/sgdisk -o -n 1:2048:+1M -c 1:dabei-seed -n 2:0:0 -c 2:root $out/disk.img >/dev/null
        /usr/bin/seq 1 200000 | /usr/bin/dd of=$out/disk.img bs=64K seek=64 conv=notrunc status=none
      '' ];
    };
    packages.x86_64-linux.broken = builtins.derivation {
      name = "dabei-broken";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" "echo the image recipe failed >&2; exit 1" ];
    };
  };
}
"""


@pytest.fixture
def flake(tmp_path: Path) -> str:
    directory = tmp_path / "flake"
    directory.mkdir()
    (directory / "flake.nix").write_text(FLAKE)
    return f"path:{directory}"


def test_build_image_runs_nix_build_and_prepare_compresses_once(flake: str, tmp_path: Path) -> None:
    store_path = build_image(flake, "image", nix_args=OFFLINE_NIX_ARGS)
    assert store_path.startswith("/nix/store/") and store_path.endswith("-dabei-test-image")
    image_file = find_image_file(store_path)
    assert image_file == f"{store_path}/disk.img"

    prepared = prepare_image(image_file, tmp_path / "cache")
    compressed = Path(prepared.compressed_path)
    assert prepared.store_path == store_path
    assert prepared.raw_size == 8 * 1024 * 1024
    assert (prepared.seed_offset, prepared.seed_size) == (2048 * 512, 1024 * 1024)
    assert prepared.compressed_size == compressed.stat().st_size < prepared.raw_size
    assert prepared.compressed_sha256 == hashlib.sha256(compressed.read_bytes()).hexdigest()
    restored = subprocess.run(["zstd", "-d", "-c", str(compressed)], check=True, capture_output=True).stdout
    assert restored == Path(image_file).read_bytes()

    written = compressed.stat().st_mtime_ns
    again = prepare_image(image_file, tmp_path / "cache")
    assert again == prepared
    assert compressed.stat().st_mtime_ns == written
    assert PreparedImage.from_json(json.loads(json.dumps(again.to_json()))) == prepared


def test_a_failing_build_names_the_installable_and_its_error(flake: str) -> None:
    with pytest.raises(ImageError, match=r"(?s)#broken failed .*the image recipe failed"):
        build_image(flake, "broken", nix_args=OFFLINE_NIX_ARGS)


def test_bad_flake_references_are_refused_before_running_nix() -> None:
    with pytest.raises(ImageError, match="flake reference"):
        build_image("path:/x#y", "image")
    with pytest.raises(ImageError, match="image attribute"):
        build_image("path:/x", "")


def test_the_build_output_must_hold_exactly_one_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError, match=r"exactly one .* found \[\]"):
        find_image_file(str(out))
    (out / "a.img").write_bytes(b"a")
    (out / "b.raw").write_bytes(b"b")
    with pytest.raises(ImageError, match=r"found \['a.img', 'b.raw'\]"):
        find_image_file(str(out))


def test_an_image_without_a_seed_partition_is_refused(tmp_path: Path) -> None:
    image = make_gpt_image(tmp_path / "noseed.img", seed=False)
    with pytest.raises(ImageError, match=r"noseed\.img.*dabei-seed"):
        prepare_image(image, tmp_path / "cache")


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    image = make_gpt_image(tmp_path / "disk.img")
    prepared = prepare_image(image, tmp_path / "cache")
    with open(prepared.compressed_path, "r+b") as handle:
        handle.truncate(prepared.compressed_size // 2)
    again = prepare_image(image, tmp_path / "cache")
    assert again == prepared
    assert Path(again.compressed_path).stat().st_size == prepared.compressed_size


def test_concurrent_prepares_of_one_image_compress_it_once(tmp_path: Path, monkeypatch) -> None:
    image = make_gpt_image(tmp_path / "disk.img")
    compressions = []
    lock = threading.Lock()
    real_compress = imaging._compress

    def counting_compress(source: Path, target: Path) -> tuple[int, str]:
        with lock:
            compressions.append(source)
        return real_compress(source, target)

    monkeypatch.setattr(imaging, "_compress", counting_compress)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_image(image, tmp_path / "cache"), range(4)))
    assert len(compressions) == 1
    assert all(result == results[0] for result in results)
    entry = Path(results[0].compressed_path).parent
    assert sorted(p.name for p in entry.iterdir()) == ["image.zst", "meta.json"]


def test_prepared_image_records_must_be_complete(tmp_path: Path) -> None:
    image = make_gpt_image(tmp_path / "disk.img")
    record = prepare_image(image, tmp_path / "cache").to_json()
    record = {name: float(value) if isinstance(value, int) else value for name, value in record.items()}
    assert PreparedImage.from_json(record).raw_size == 16 * 1024 * 1024
    del record["compressed_sha256"]
    with pytest.raises(ImageError, match="compressed_sha256"):
        PreparedImage.from_json(record)
