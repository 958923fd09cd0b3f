"""Encryption recipients of a host, known before the server exists: its generated SSH host key, as agenix
and sops-nix take it.

- agenix encrypts to the `ssh-ed25519 AAAA...` public key itself (age's SSH recipient type).
- sops-nix encrypts to an age X25519 recipient (`age1...`) and, on the host, decrypts with the SSH host key
  converted to an X25519 identity (`sops.age.sshKeyPaths`). The conversion is the one ssh-to-age does: the
  Ed25519 public key mapped to its Montgomery form (RFC 7748 section 4.1's birational map), the private key
  as the first 32 bytes of SHA-512 of the Ed25519 seed (RFC 8032 section 5.1.5), both through libsodium
  (`crypto_sign_ed25519_pk_to_curve25519`, `..._sk_to_curve25519`), Bech32-encoded (BIP 173) with the
  human-readable parts age uses (`age`, `AGE-SECRET-KEY-`: age-encryption.org/v1, "X25519 recipients").

Command line (for scripts in the user's repository; reads the key on standard input):
`python -m dabei_component.recipients age-recipient < host.pub` prints `age1...`;
`python -m dabei_component.recipients age-identity < ssh_host_ed25519_key` prints `AGE-SECRET-KEY-1...`.
"""

from __future__ import annotations

import sys

import bech32
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from nacl import bindings

from .keys import parse_public_key

AGE_RECIPIENT_HRP = "age"
AGE_IDENTITY_HRP = "age-secret-key-"


class RecipientError(ValueError):
    """The key cannot be converted; the text never contains key material."""


def _encode(hrp: str, data: bytes) -> str:
    words = bech32.convertbits(list(data), 8, 5)
    if words is None:  # cannot happen for 32 bytes; keeps the types honest
        raise RecipientError("cannot encode the key as Bech32")
    return str(bech32.bech32_encode(hrp, words))


def _ed25519_public(line: str) -> bytes:
    normalized = parse_public_key(line, name="host public key")
    if not normalized.startswith("ssh-ed25519 "):
        raise RecipientError(f"host public key: an age recipient needs an ssh-ed25519 key, got {normalized.split()[0]}")
    key = serialization.load_ssh_public_key(normalized.encode())
    assert isinstance(key, ed25519.Ed25519PublicKey)  # the line's type says so
    return key.public_bytes_raw()


def age_recipient(public_key: str) -> str:
    """The age X25519 recipient (`age1` + 58 characters) of an `ssh-ed25519` OpenSSH public key line, as
    `ssh-to-age` prints it. Raises RecipientError (or ValueError naming the input) for another key type or
    a malformed line."""
    try:
        montgomery = bindings.crypto_sign_ed25519_pk_to_curve25519(_ed25519_public(public_key))
    except RuntimeError:
        raise RecipientError("host public key: not a point on the Ed25519 curve") from None
    return _encode(AGE_RECIPIENT_HRP, montgomery)


def age_identity(private_key: str) -> str:
    """The age X25519 identity (`AGE-SECRET-KEY-1...`) of an OpenSSH `ssh-ed25519` private key, as
    `ssh-to-age -private-key` prints it. A secret: never log it. Raises RecipientError."""
    try:
        key = serialization.load_ssh_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise RecipientError("host private key: not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RecipientError("host private key: an age identity needs an ssh-ed25519 key")
    seed = key.private_bytes_raw()  # the 32-byte Ed25519 seed
    public = key.public_key().public_bytes_raw()
    scalar = bindings.crypto_sign_ed25519_sk_to_curve25519(seed + public)
    return _encode(AGE_IDENTITY_HRP, scalar).upper()


def recipients(public_key: str) -> dict[str, str]:
    """`{"ssh": <the ssh-ed25519 line, for agenix>, "age": <age1..., for sops-nix>}` of a host's key."""
    line = parse_public_key(public_key, name="host public key")
    return {"ssh": " ".join(line.split()[:2]), "age": age_recipient(line)}


def main(argv: list[str]) -> int:
    commands = {"age-recipient": age_recipient, "age-identity": age_identity}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m dabei_component.recipients {{{','.join(commands)}}} < KEY", file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](sys.stdin.read()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
