"""The per-host seed: a GPT partition named ``dabei-seed`` holding a length-prefixed JSON document.

Layout of the partition: ``MAGIC (8 bytes) | version (u32 BE) | length (u32 BE) | JSON (UTF-8) | zeros``.
The component writes it with ``encode_seed`` (after locating the partition with ``find_seed_partition``);
the first boot reads it with ``read_seed`` and wipes it with ``wipe_seed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

MAGIC = b"DABEISD\x00"
VERSION = 1
PARTITION_NAME = "dabei-seed"
PARTITION_SIZE = 1024 * 1024
HEADER = struct.Struct(">8sII")
MAX_DOCUMENT = PARTITION_SIZE - HEADER.size

_GPT_SIGNATURE = b"EFI PART"
# signature, revision, header size, header crc32, reserved, current lba, backup lba, first usable lba,
# last usable lba, disk guid, entries lba, number of entries, entry size, entries crc32
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# type guid, unique guid, first lba, last lba, attributes, name (UTF-16LE, 36 code units)
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_SECTOR_SIZES = (512, 4096)
_MAX_ENTRIES_BYTES = 16 * 1024 * 1024


class SeedError(Exception):
    """A seed or the disk holding it is missing or malformed. Messages never contain key material."""


class SeedEmpty(SeedError):
    """The seed partition holds no document (never written, or already applied and wiped)."""


def validate_seed(doc: Any) -> dict[str, Any]:
    """Check a seed document (version 1) and return it; raise SeedError naming the bad field."""
    if not isinstance(doc, dict):
        raise SeedError(f"seed document must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"flake", "hostname", "host_key", "authorized_keys"}
    if unknown:
        raise SeedError(f"seed document has unknown fields: {sorted(unknown)}")
    flake = doc.get("flake")
    if not isinstance(flake, str) or not flake.strip() or any(c.isspace() for c in flake):
        raise SeedError("seed field 'flake' must be a non-empty flake reference without whitespace")
    hostname = doc.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not _is_hostname(hostname)):
        raise SeedError(f"seed field 'hostname' must be null or a valid hostname, got {hostname!r}")
    host_key = doc.get("host_key")
    if not isinstance(host_key, dict):
        raise SeedError("seed field 'host_key' must be an object with 'type', 'private' and 'public'")
    if host_key.get("type") != "ssh-ed25519":
        raise SeedError(f"seed field 'host_key.type' must be 'ssh-ed25519', got {host_key.get('type')!r}")
    private = host_key.get("private")
    if not isinstance(private, str) or "-----BEGIN OPENSSH PRIVATE KEY-----" not in private:
        raise SeedError("seed field 'host_key.private' must be an OpenSSH PEM private key")
    public = host_key.get("public")
    if not isinstance(public, str) or not public.startswith("ssh-ed25519 ") or "\n" in public.strip():
        raise SeedError("seed field 'host_key.public' must be one 'ssh-ed25519 ...' public key line")
    keys = doc.get("authorized_keys")
    if not isinstance(keys, list):
        raise SeedError("seed field 'authorized_keys' must be a list of public key lines")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip() or "\n" in key.strip() or "\r" in key:
            raise SeedError(f"seed field 'authorized_keys[{index}]' must be one non-empty public key line")
    return doc


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def seed_fingerprint(doc: dict[str, Any]) -> str:
    """sha256 over the seed's public parts (the private key's public half stands for it): recorded when a
    seed is applied, so a seed found again on a later boot (its wipe failed) is recognized and only wiped."""
    public = {k: v for k, v in doc.items() if k != "host_key"} | {"host_key": doc["host_key"]["public"].strip()}
    return hashlib.sha256(json.dumps(public, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_seed(doc: dict[str, Any], size: int | None = None) -> bytes:
    """Encode a seed document; with ``size`` the result is zero-padded to exactly that many bytes."""
    validate_seed(doc)
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(body) > MAX_DOCUMENT:
        raise SeedError(f"seed document is {len(body)} bytes, the partition holds at most {MAX_DOCUMENT}")
    raw = HEADER.pack(MAGIC, VERSION, len(body)) + body
    if size is not None:
        if size < len(raw):
            raise SeedError(f"seed needs {len(raw)} bytes but the target holds only {size}")
        raw += bytes(size - len(raw))
    return raw


def decode_seed(raw: bytes) -> dict[str, Any]:
    """Decode the bytes of a seed partition (trailing padding is ignored)."""
    if len(raw) < HEADER.size:
        raise SeedError(f"seed data is {len(raw)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, length = HEADER.unpack_from(raw)
    if magic != MAGIC:
        if not any(raw[: HEADER.size]):
            raise SeedEmpty("seed partition is empty (never written, or already applied and wiped)")
        raise SeedError("seed partition does not start with the seed magic 'DABEISD'")
    if version != VERSION:
        raise SeedError(f"seed version {version} is not supported (this program reads version {VERSION})")
    if length > len(raw) - HEADER.size:
        raise SeedError(f"seed header announces {length} bytes but only {len(raw) - HEADER.size} follow")
    try:
        doc = json.loads(raw[HEADER.size : HEADER.size + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # The position only: the text may hold key material.
        raise SeedError(f"seed document is not valid UTF-8 JSON ({type(exc).__name__})") from None
    return validate_seed(doc)


def _device_size(handle: Any) -> int:
    return int(handle.seek(0, os.SEEK_END))


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    handle.seek(offset)
    data = bytes(handle.read(size))
    if len(data) != size:
        raise SeedError(f"short read at byte {offset}: wanted {size} bytes, got {len(data)}")
    return data


def _gpt_header(handle: Any, path: Path) -> tuple[int, tuple[Any, ...]]:
    for sector in _SECTOR_SIZES:
        handle.seek(sector)
        raw = handle.read(_GPT_HEADER.size)
        if len(raw) == _GPT_HEADER.size and raw[:8] == _GPT_SIGNATURE:
            return sector, _GPT_HEADER.unpack(raw)
    raise SeedError(f"{path}: no GPT header found (no 'EFI PART' signature at LBA 1)")


def list_partitions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the primary GPT of a disk or disk image: name, first/last LBA, offset and size of each entry."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            sector, header = _gpt_header(handle, path)
            (_, _, header_size, header_crc, _, _, _, _, _, _, entries_lba, count, entry_size, entries_crc) = header
            if not _GPT_HEADER.size <= header_size <= sector:
                raise SeedError(f"{path}: GPT header size {header_size} is invalid")
            raw_header = bytearray(_read_at(handle, sector, header_size))
            raw_header[16:20] = b"\x00\x00\x00\x00"
            if zlib.crc32(raw_header) != header_crc:
                raise SeedError(f"{path}: GPT header checksum mismatch (corrupt partition table)")
            if entry_size < _GPT_ENTRY.size or count * entry_size > _MAX_ENTRIES_BYTES:
                raise SeedError(f"{path}: GPT entry table ({count} x {entry_size} bytes) is invalid")
            table = _read_at(handle, entries_lba * sector, count * entry_size)
            if zlib.crc32(table) != entries_crc:
                raise SeedError(f"{path}: GPT partition entries checksum mismatch")
    except OSError as exc:
        raise SeedError(f"cannot read disk {path}: {exc.strerror or exc}") from None
    partitions = []
    for index in range(count):
        type_guid, _, first, last, _, name_raw = _GPT_ENTRY.unpack_from(table, index * entry_size)
        if not any(type_guid):
            continue
        name = name_raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        partitions.append(
            {
                "number": index + 1,
                "name": name,
                "first_lba": first,
                "last_lba": last,
                "offset": first * sector,
                "size": (last - first + 1) * sector,
            }
        )
    return partitions


def find_seed_partition(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(offset, size)`` in bytes of the partition named ``dabei-seed`` on a disk or image file."""
    matches = [p for p in list_partitions(path) if p["name"] == PARTITION_NAME]
    if not matches:
        raise SeedError(f"{path}: no GPT partition named {PARTITION_NAME!r}")
    if len(matches) > 1:
        raise SeedError(f"{path}: {len(matches)} GPT partitions are named {PARTITION_NAME!r}, expected one")
    return matches[0]["offset"], matches[0]["size"]


def read_seed(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Find and decode the seed on a disk; raises SeedEmpty when the partition holds no document."""
    offset, size = find_seed_partition(path)
    try:
        with open(path, "rb") as handle:
            if _device_size(handle) < offset + size:
                raise SeedError(f"{path}: seed partition ends beyond the end of the disk")
            header = _read_at(handle, offset, HEADER.size)
            _, _, length = HEADER.unpack(header)
            body = _read_at(handle, offset + HEADER.size, min(length, size - HEADER.size))
    except OSError as exc:
        raise SeedError(f"cannot read seed from {path}: {exc.strerror or exc}") from None
    return decode_seed(header + body)


def write_seed(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write a seed into the ``dabei-seed`` partition of a disk or image file (the whole partition)."""
    offset, size = find_seed_partition(path)
    _overwrite(path, offset, encode_seed(doc, size))


def wipe_seed(path: str | os.PathLike[str]) -> None:
    """Overwrite the whole seed partition with zeros and flush it to the device."""
    offset, size = find_seed_partition(path)
    _overwrite(path, offset, bytes(size))


def _overwrite(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SeedError(f"cannot write seed partition of {path}: {exc.strerror or exc}") from None
