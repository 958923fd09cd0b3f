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

from .keys import SUPPORTED_KEY_TYPES, PublicKey, parse_public_key, public_key_of, read_public_key

Problem = tuple[str, str]

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A URL without spaces, or a path on the deployer (`.`, `./infra`, `/srv/my infra`: spaces allowed).
# A URL without spaces, or a path (plain, or `path:` without query) which may hold them.
_FLAKE_REF = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s#]+$|^[./][^#\n]*$|^path:[^#?\n]+$")
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
    """A flake reference as Nix takes it, without `#` (the component adds the host's attribute)."""
    if isinstance(value, str) and _FLAKE_REF.match(value):
        return []
    hint = ""
    if isinstance(value, str):
        if "#" in value:
            hint = "; leave out '#…': the component builds <flake>#<host name>"
        elif re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", value):
            hint = f"; a directory is written ./{value}"
        elif any(c.isspace() for c in value):
            hint = "; a URL has no spaces: write a directory with one as ./my dir or path:./my dir"
    return [
        (
            prop,
            "expected a flake reference: a URL such as github:owner/repo or git+https://host/repo, or a "
            f"directory such as . or ./infra, got {value!r}{hint}",
        )
    ]


def ssh_key_entry(value: Any) -> PublicKey | str | int:
    """What one `ssh_keys` entry is: a pasted public key (it parses as one), a Hetzner SSH key ID (an
    integer), or else the name of a key in the Hetzner project (free text: `My ssh key`, `me@laptop`).

    Raises ValueError with the reason (without the property) for an entry that is none of these.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a public key, a key name or a key ID, got {_kind(value)}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a Hetzner SSH key ID is a positive integer, got {value}")
        return value
    if not value.strip():
        raise ValueError("expected a public key or a Hetzner SSH key name, got an empty string")
    return read_public_key(value) or value


def not_a_key_hint(name: str) -> str:
    """Why a key name that starts like a public key does not parse as one ('' for other names)."""
    if name.split(maxsplit=1)[0] not in SUPPORTED_KEY_TYPES:
        return ""
    try:
        parse_public_key(name)
    except ValueError as exc:
        return f"; it is no public key either: {str(exc).removeprefix('public key: ')}"
    return ""


def ssh_keys(prop: str, value: Any) -> list[Problem]:
    """Pasted OpenSSH public keys, Hetzner SSH key names or IDs, one key per entry. Whether a name or ID
    exists in the project is checked where the project is read (component.py)."""
    if not isinstance(value, list):
        return [(prop, f"expected a list of SSH public keys or Hetzner SSH key names, got {_kind(value)}")]
    problems: list[Problem] = []
    seen: dict[str | int, int] = {}
    for i, entry in enumerate(value):
        where = f"{prop}[{i}]"
        try:
            key = ssh_key_entry(entry)
        except ValueError as exc:
            problems.append((where, str(exc)))
            continue
        ident = key.md5 if isinstance(key, PublicKey) else key
        if ident in seen:
            problems.append((where, f"the same key as {prop}[{seen[ident]}]"))
        seen.setdefault(ident, i)
    return problems


def labels(prop: str, value: Any) -> list[Problem]:
    """Hetzner label syntax (Hetzner Cloud API reference, "Labels"; the value pattern is the `labels`
    schema of the API specification): keys `[prefix/]name`, the prefix a DNS subdomain of up to 253
    characters, the name and the value up to 63 letters, digits, '-', '_', '.' starting and ending with a
    letter or digit; values may be empty; the `hetzner.cloud/` prefix is Hetzner's own."""
    if not isinstance(value, Mapping):
        return [(prop, f"expected a map of label names to values, got {_kind(value)}")]
    problems: list[Problem] = []
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            problems.append(
                (
                    f"{prop}.{k}",
                    "label keys are [prefix/]name: the name up to 63 letters, digits, '-', '_', '.', starting "
                    "and ending with a letter or digit; the prefix a DNS name",
                )
            )
        elif k.startswith("hetzner.cloud/"):
            problems.append((f"{prop}.{k}", "the label prefix hetzner.cloud/ is reserved for Hetzner"))
        if not isinstance(v, str):
            problems.append((f"{prop}.{k}", f"label values are strings, got {_kind(v)}"))
        elif not _LABEL_VALUE.match(v):
            problems.append(
                (
                    f"{prop}.{k}",
                    "label values are empty or up to 63 letters, digits, '-', '_', '.', starting and ending "
                    f"with a letter or digit; got {v!r}",
                )
            )
    return problems


def disk(prop: str, value: Any) -> list[Problem]:
    if not isinstance(value, str) or not _DISK.match(value):
        return [(prop, f"expected a whole-disk device like /dev/sda or /dev/disk/by-id/..., got {value!r}")]
    return []


def positive_seconds(prop: str, value: Any) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return [(prop, f"expected a positive number of seconds (finite), got {value!r}")]
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


def ipv6(prop: str, value: Any) -> list[Problem]:
    try:
        ipaddress.IPv6Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return [(prop, f"expected an IPv6 address like 2001:db8::1, got {value!r}")]
    return []


def _kind(value: Any) -> str:
    return repr(value) if isinstance(value, str | int | float | type(None)) else type(value).__name__
