"""Recipients for agenix and sops-nix from a host key, checked against the real `age` tool."""

from __future__ import annotations

import subprocess

import pytest

from dabei_component.keys import generate_ssh_keypair
from dabei_component.recipients import RecipientError, age_identity, age_recipient, recipients


def _age(*args: str, data: bytes) -> bytes:
    return subprocess.run(["age", *args], input=data, capture_output=True, check=True).stdout


def test_age_keygen_derives_our_recipient_from_our_identity(tmp_path):
    # Two implementations side by side: libsodium's Edwards-to-Montgomery map of the public key, and age's
    # own X25519 base-point multiplication of the converted private key.
    for _ in range(5):
        pair = generate_ssh_keypair()
        identity = tmp_path / "id"
        identity.write_text(age_identity(pair.private_openssh) + "\n")
        derived = subprocess.run(["age-keygen", "-y", str(identity)], capture_output=True, text=True, check=True)
        assert derived.stdout.strip() == age_recipient(pair.public)


def test_encrypted_to_the_recipient_decrypts_with_the_converted_ssh_key(tmp_path):
    pair = generate_ssh_keypair()
    identity = tmp_path / "id"
    identity.write_text(age_identity(pair.private_openssh) + "\n")
    sealed = _age("-r", age_recipient(pair.public), data=b"db-password")
    assert _age("-d", "-i", str(identity), data=sealed) == b"db-password"
    other = generate_ssh_keypair()
    identity.write_text(age_identity(other.private_openssh) + "\n")
    with pytest.raises(subprocess.CalledProcessError):
        _age("-d", "-i", str(identity), data=sealed)


def test_recipients_shape_and_refusals():
    pair = generate_ssh_keypair(comment="web-1")
    found = recipients(pair.public + "  ")
    assert found["ssh"] == " ".join(pair.public.split()[:2])
    assert found["age"].startswith("age1") and len(found["age"]) == 62
    with pytest.raises(ValueError, match="host public key"):
        age_recipient("ecdsa-sha2-nistp256 AAAA")
    with pytest.raises(RecipientError, match="not an unencrypted OpenSSH private key") as caught:
        age_identity("-----BEGIN OPENSSH PRIVATE KEY-----\nnonsense\n-----END OPENSSH PRIVATE KEY-----\n")
    assert "nonsense" not in str(caught.value)
