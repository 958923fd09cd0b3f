"""Input checks shared by the component (at program time) and the steps' `check()` (at preview).

Each check returns a list of (property, reason) pairs; an empty list means the value is fine. Reasons say
what was expected, so the message alone tells the user how to fix the input.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any

from .keys import parse_public_key, public_key_of

Problem = tuple[str, str]

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_FLAKE_REF = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s#]+$|^[./][^\s#]*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_DISK = re.compile(r"^/dev/(sd[a-z]+|vd[a-z]+|nvme\d+n\d+|disk/by-[a-z]+/[A-Za-z0-9._:-]+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_REINSTALL_REQUEST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,62}$")


def hostname(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, str) or not value:
        return [(prop, f"expected a hostname (lowercase letters, digits, '-'), got {value!r}")]
    if len(value) > 63 or not _HOSTNAME_LABEL.match(value):
        return [
            (
                prop,
                f"{value!r} is not a valid hostname: 1-63 lowercase letters, digits and '-', "
                "not starting or ending with '-'",
            )
        ]
    return []


def flake_ref(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, str) or not _FLAKE_REF.match(value):
        return [
            (
                prop,
                f"expected a flake reference without '#' such as github:owner/repo or git+https://host/repo, "
                f"got {value!r}",
            )
        ]
    return []


def ssh_keys(prop: str, value: Any) -> list[Problem]:
    """Names of existing Hetzner SSH keys, or OpenSSH public key lines, one key per entry."""
    if not isinstance(value, list):
        return [(prop, f"expected a list of SSH public keys or Hetzner SSH key names, got {type(value).__name__}")]
    problems: list[Problem] = []
    seen = set()
    for i, key in enumerate(value):
        where = f"{prop}[{i}]"
        if not isinstance(key, str) or not key.strip():
            problems.append((where, "expected a non-empty public key or key name"))
            continue
        if key in seen:
            problems.append((where, f"duplicate key {key[:40]!r}"))
        seen.add(key)
        if " " in key.strip() or key.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                parse_public_key(key, name=where)
            except ValueError as exc:
                problems.append((where, str(exc)))
        elif not _NAME.match(key):
            problems.append((where, f"{key!r} is neither an OpenSSH public key nor a Hetzner SSH key name"))
    return problems


def labels(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [(prop, f"expected a map of label names to values, got {type(value).__name__}")]
    problems: list[Problem] = []
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            problems.append(
                (f"{prop}.{k}", "label keys are up to 63 letters, digits, '-', '_', '.' (optional prefix/)")
            )
        if not isinstance(v, str) or not _LABEL_VALUE.match(v):
            problems.append((f"{prop}.{k}", f"label values are up to 63 letters, digits, '-', '_', '.'; got {v!r}"))
    return problems


def disk(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, str) or not _DISK.match(value):
        return [(prop, f"expected a whole-disk device like /dev/sda or /dev/disk/by-id/..., got {value!r}")]
    return []


def positive_seconds(prop: str, value: Any) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return [(prop, f"expected a positive number of seconds, got {value!r}")]
    return []


def reinstall(prop: str, value: Any) -> list[Problem]:
    """A reinstall request: None (none), or an ID such as a date; a new ID wipes and reinstalls the host."""
    if value is None:
        return []
    if value == "on-image-change":
        return [
            (
                prop,
                "'on-image-change' is gone: a new image never rewrites an installed host's disk (it applies to "
                "hosts installed from then on). Remove the key, or set it to a new request ID such as "
                "'2026-12-01' to wipe and reinstall this one host",
            )
        ]
    if not isinstance(value, str) or not _REINSTALL_REQUEST.match(value):
        return [
            (
                prop,
                f"expected a reinstall request ID (1-63 letters, digits, '.', '_', ':', '+', '-'), such as "
                f"'2026-12-01', got {value!r}",
            )
        ]
    return []


def name(prop: str, value: Any, what: str) -> list[Problem]:
    if not isinstance(value, str) or not _NAME.match(value):
        return [(prop, f"expected a {what} name like cx22 or fsn1, got {value!r}")]
    return []


def firewall_ids(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, list) or not all(
        (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (isinstance(v, str) and v.isdigit())
        for v in value
    ):
        return [(prop, f"expected a list of firewall ids (positive integers), got {value!r}")]
    return []


def public_key(prop: str, value: Any) -> list[Problem]:
    """One OpenSSH public key line (`type base64 [comment]`)."""
    try:
        parse_public_key(value, name=prop)
    except ValueError as exc:
        reason = str(exc).removeprefix(f"{prop}: ")
        return [(prop, f"expected one OpenSSH public key line such as 'ssh-ed25519 AAAA...'; {reason}")]
    return []


def public_keys(prop: str, value: Any) -> list[Problem]:
    """A non-empty list of OpenSSH public key lines, one key per entry."""
    if not isinstance(value, list) or not value:
        return [(prop, f"expected a non-empty list of OpenSSH public keys, got {_kind(value)}")]
    return [p for i, key in enumerate(value) for p in public_key(f"{prop}[{i}]", key)]


def private_key(prop: str, value: Any) -> list[Problem]:
    """An unencrypted OpenSSH private key; the reason never echoes the value."""
    try:
        public_key_of(value)
    except ValueError:
        return [(prop, "expected an unencrypted OpenSSH private key (the value is not shown)")]
    return []


def hetzner_id(prop: str, value: Any, what: str = "server") -> list[Problem]:
    # State hands integers back as floats: 17.0 is the server 17.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
        or value < 1
    ):
        return [(prop, f"expected a Hetzner {what} ID (a positive integer), got {value!r}")]
    return []


def ipv4(prop: str, value: Any) -> list[Problem]:
    try:
        ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return [(prop, f"expected an IPv4 address like 192.0.2.10, got {value!r}")]
    return []


def _kind(value: Any) -> str:
    return repr(value) if isinstance(value, str | int | float | type(None)) else type(value).__name__
