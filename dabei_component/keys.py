"""SSH key material: generation, validation and the strings other tools consume."""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

import asyncssh

# Public key types accepted for authorized keys and host keys.
SUPPORTED_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


@dataclass(frozen=True)
class SshKeyPair:
    """An ed25519 key pair; `private_openssh` is secret and must never be logged or returned unmarked."""

    private_openssh: str
    public: str

    def __repr__(self) -> str:
        return f"SshKeyPair(public={self.public!r}, private_openssh=<secret>)"


def generate_ssh_keypair(comment: str = "") -> SshKeyPair:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment or None)
    private = key.export_private_key("openssh").decode()
    public = key.export_public_key("openssh").decode().strip()
    return SshKeyPair(private_openssh=private, public=public)


def parse_public_key(text: str, *, name: str = "public key") -> str:
    """Validate one OpenSSH public key line and return it normalized as `type base64 [comment]`.

    `name` says which input is checked, so errors name it (for example `ssh_keys[2]`).
    """
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, got {type(text).__name__}")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{name}: is empty")
    if len(lines) > 1:
        raise ValueError(f"{name}: holds {len(lines)} lines; give exactly one key per entry")
    fields = lines[0].split()
    type_positions = [i for i, field in enumerate(fields) if field in SUPPORTED_KEY_TYPES]
    if len(type_positions) > 1:
        raise ValueError(f"{name}: several keys on one line; give exactly one key per entry")
    if not type_positions:
        raise ValueError(
            f"{name}: unsupported key type {fields[0][:40]!r}; expected one of {sorted(SUPPORTED_KEY_TYPES)}"
        )
    if type_positions[0] != 0:
        raise ValueError(f"{name}: key options before the key type are not supported")
    if len(fields) < 2:
        raise ValueError(f"{name}: the base64 key data after {fields[0]!r} is missing")
    key_type, data = fields[0], fields[1]
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: the key data is not valid base64") from None
    # The blob starts with its own type name; a mismatch means a damaged or pasted-together key.
    try:
        (type_len,) = struct.unpack(">I", blob[:4])
        blob_type = blob[4 : 4 + type_len].decode("ascii")
    except (struct.error, UnicodeDecodeError):
        raise ValueError(f"{name}: the key data is not an SSH public key") from None
    if blob_type != key_type:
        raise ValueError(f"{name}: the key data is a {blob_type[:40]!r} key, but the line says {key_type!r}")
    try:
        asyncssh.import_public_key(f"{key_type} {data}")
    except (asyncssh.KeyImportError, ValueError):
        raise ValueError(f"{name}: the {key_type} key data is damaged") from None
    comment = " ".join(fields[2:])
    return f"{key_type} {data} {comment}" if comment else f"{key_type} {data}"


@dataclass(frozen=True)
class PublicKey:
    """One OpenSSH public key: `line` is `type base64 [comment]`, `blob` is `type base64` (what identifies
    the key, whatever the comment and spacing), `md5` is its fingerprint as Hetzner's API gives it
    (`aa:bb:...`, the `fingerprint` field of an SSH key)."""

    line: str
    blob: str
    md5: str


def read_public_key(text: str) -> PublicKey | None:
    """`text` as a public key when asyncssh parses it as one OpenSSH public key line, else None.

    Raises ValueError when the text holds several lines of which one is a key (several keys pasted into
    one entry), or a key of a type not in SUPPORTED_KEY_TYPES.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    keys = []
    for line in lines:
        # asyncssh refuses a comment that is not ASCII (`jürgen@büro`, a pasted non-breaking space): the
        # comment is no part of the key, so such a line is read by its type and data alone.
        for candidate in (line, " ".join(line.split()[:2])):
            try:
                keys.append(asyncssh.import_public_key(candidate))
                break
            except (asyncssh.KeyImportError, ValueError, TypeError):
                continue
    if not keys:
        return None
    if len(lines) > 1:
        raise ValueError(f"holds {len(lines)} lines; give exactly one key per entry")
    key = keys[0]
    key_type = key.get_algorithm()
    if key_type not in SUPPORTED_KEY_TYPES:
        raise ValueError(f"unsupported key type {key_type!r}; expected one of {sorted(SUPPORTED_KEY_TYPES)}")
    line = key.export_public_key("openssh").decode().strip()
    blob = " ".join(line.split()[:2])
    return PublicKey(line=line, blob=blob, md5=key.get_fingerprint("md5").removeprefix("MD5:"))


def _type_and_data(public_key: str) -> str:
    key_type, data = parse_public_key(public_key).split()[:2]
    return f"{key_type} {data}"


def known_hosts_line(host: str, public_key: str, *, port: int = 22) -> str:
    """A known_hosts line for `host` (bracketed with the port when it is not 22)."""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"host: {host!r} is not a host name or address")
    if port != 22:
        host = f"[{host}]:{port}"
    return f"{host} {_type_and_data(public_key)}"


def fingerprint(public: str) -> str:
    """The OpenSSH SHA256 fingerprint (`SHA256:...`) of a public key."""
    return asyncssh.import_public_key(_type_and_data(public)).get_fingerprint("sha256")


def public_key_of(private_openssh: str) -> str:
    """The public key (`type base64`) of an OpenSSH private key; errors never echo the key."""
    try:
        key = asyncssh.import_private_key(private_openssh)
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise ValueError("private key: not a valid unencrypted OpenSSH private key") from None
    return " ".join(key.export_public_key("openssh").decode().split()[:2])
