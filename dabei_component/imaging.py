"""Building the disk image with Nix and preparing it (compressed once, cached) for writing to servers.

Integrity: the image is identified by its Nix store path, which already content-addresses it, so the
raw image is never hashed (3 GiB of sha256 on every prepare would cost more than sending it). What is
hashed is the compressed file, while it is produced; the write step checks that the host received
exactly those bytes, and zstd's per-frame content checksums (always on here) check the decompression.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dabei_firstboot.seed import SeedError, find_seed_partition

NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")
IMAGE_SUFFIXES = (".img", ".raw")
# zstd -3 with all cores: the wire-size reference of the benchmarks and fast enough to run once per image.
ZSTD_LEVEL = 3
_CHUNK = 1024 * 1024
_META_VERSION = 1
# Nix as it runs without network or build users (this project's CI, the demo, the tests): no binary cache,
# no sandbox, no build-users group.
OFFLINE_NIX_ARGS = ("--option", "substituters", "", "--option", "sandbox", "false", "--option", "build-users-group", "")


class ImageError(Exception):
    """Building or preparing an image failed."""


@dataclass(frozen=True)
class PreparedImage:
    """A compressed, cached image ready to be streamed; JSON-able through `to_json`/`from_json`."""

    store_path: str
    image_file: str
    raw_size: int
    compressed_path: str
    compressed_size: int
    compressed_sha256: str
    zstd_level: int
    seed_offset: int
    seed_size: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreparedImage:
        names = {field.name for field in dataclasses.fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ImageError(f"prepared image record lacks {sorted(missing)}")
        values = {name: data[name] for name in names}
        # Pulumi hands integers back as floats.
        for name in ("raw_size", "compressed_size", "zstd_level", "seed_offset", "seed_size"):
            values[name] = int(values[name])
        return cls(**values)


def build_image(flake_ref: str, attr: str, *, nix_args: tuple[str, ...] | list[str] = ()) -> str:
    """Run `nix build` for `<flake_ref>#<attr>` and return the store path it printed."""
    if not flake_ref or any(c.isspace() for c in flake_ref) or "#" in flake_ref:
        raise ImageError(f"flake reference {flake_ref!r} is invalid (no spaces, no '#')")
    if not attr or any(c.isspace() for c in attr):
        raise ImageError(f"image attribute {attr!r} is invalid")
    installable = f"{flake_ref}#{attr}"
    # `--json` rather than `--print-out-paths`, which Nix only has since 2.9.
    command = ["nix", *NIX_FEATURES, "build", "--no-link", "--json", *nix_args, installable]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError("nix is not installed (needed to build the image)") from None
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-20:])
        raise ImageError(f"nix build {installable} failed with exit status {completed.returncode}: {tail}")
    try:
        paths = [path for result in json.loads(completed.stdout) for path in result["outputs"].values()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ImageError(f"nix build {installable} printed no JSON build result: {completed.stdout[:500]}") from None
    if len(paths) != 1:
        raise ImageError(f"nix build {installable} produced {len(paths)} outputs, expected one: {paths}")
    return str(paths[0])


def find_image_file(store_path: str) -> str:
    """The image inside a build output: the output itself if it is a file, else its single .img/.raw file."""
    path = Path(store_path)
    if path.is_file():
        return str(path)
    if not path.is_dir():
        raise ImageError(f"build output {store_path} does not exist")
    candidates = sorted(p for p in path.rglob("*") if p.suffix in IMAGE_SUFFIXES and p.is_file())
    if len(candidates) != 1:
        found = [str(p.relative_to(path)) for p in candidates]
        raise ImageError(f"build output {store_path} must hold exactly one *.img or *.raw file, found {found}")
    return str(candidates[0])


def _cache_key(image_file: Path) -> str:
    resolved = image_file.resolve()
    parts = resolved.parts
    if len(parts) > 3 and parts[1:3] == ("nix", "store"):
        # The store path names the content; the rest of the path picks the file within it.
        return "-".join(parts[3:]).replace(os.sep, "-")
    # Outside the store (tests, hand-made images) the file's identity and change time stand in for it.
    stat = resolved.stat()
    identity = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    return "file-" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def prepare_image(image_file: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> PreparedImage:
    """Compress `image_file` once into `cache_dir` and describe it; reuses a complete cache entry.

    Safe to call from several processes at once for the same image: a lock file serializes them and the
    entry appears only complete (atomic renames, the meta file last).
    """
    source = Path(image_file)
    if not source.is_file():
        raise ImageError(f"image file {source} does not exist or is not a regular file")
    raw_size = source.stat().st_size
    try:
        seed_offset, seed_size = find_seed_partition(source)
    except SeedError as exc:
        raise ImageError(f"image: {exc}") from None
    if seed_offset + seed_size > raw_size:
        raise ImageError(f"image {source}: the seed partition ends beyond the end of the image")
    key = _cache_key(source)
    cache = Path(cache_dir)
    entry = cache / key
    entry.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_entry(entry, source, raw_size)
        if cached is not None:
            return cached
        # Holding the lock, any temporary file left here is from a process that died mid-way.
        for stale in entry.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        compressed_path = entry / "image.zst"
        compressed_size, digest = _compress(source, compressed_path)
        prepared = PreparedImage(
            store_path=_store_path_of(source),
            image_file=str(source),
            raw_size=raw_size,
            compressed_path=str(compressed_path),
            compressed_size=compressed_size,
            compressed_sha256=digest,
            zstd_level=ZSTD_LEVEL,
            seed_offset=seed_offset,
            seed_size=seed_size,
        )
        meta_tmp = entry / f"meta.json.tmp-{os.getpid()}"
        meta_tmp.write_text(json.dumps({"version": _META_VERSION, "image": prepared.to_json()}))
        os.replace(meta_tmp, entry / "meta.json")
        return prepared


def _store_path_of(image_file: Path) -> str:
    parts = image_file.resolve().parts
    if len(parts) > 3 and parts[1:3] == ("nix", "store"):
        return str(Path(*parts[:4]))
    return str(image_file.resolve())


def _read_entry(entry: Path, source: Path, raw_size: int) -> PreparedImage | None:
    """The cached description if the entry is complete and belongs to this image, else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != _META_VERSION:
            return None
        prepared = PreparedImage.from_json(meta["image"])
        compressed = Path(prepared.compressed_path)
        if (
            prepared.raw_size != raw_size
            or prepared.zstd_level != ZSTD_LEVEL
            or compressed.parent != entry
            or compressed.stat().st_size != prepared.compressed_size
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError, ImageError):
        return None
    return dataclasses.replace(prepared, image_file=str(source))


def _compress(source: Path, target: Path) -> tuple[int, str]:
    """Compress with the zstd CLI (multithreaded, frame checksums on), hashing its output as it arrives."""
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    command = ["zstd", f"-{ZSTD_LEVEL}", "-T0", "--check", "-q", "-c", str(source)]
    try:
        with open(partial, "wb") as out:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdout is not None and process.stderr is not None
            buffer = bytearray(_CHUNK)
            view = memoryview(buffer)
            while True:
                count = process.stdout.readinto(view)  # type: ignore[attr-defined]
                if not count:
                    break
                digest.update(view[:count])
                out.write(view[:count])
                size += count
            stderr = process.stderr.read().decode(errors="replace")
            if process.wait() != 0:
                raise ImageError(f"zstd failed compressing {source} (exit {process.returncode}): {stderr}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except FileNotFoundError:
        raise ImageError("zstd is not installed (needed to compress the image)") from None
    finally:
        partial.unlink(missing_ok=True)
    return size, digest.hexdigest()
