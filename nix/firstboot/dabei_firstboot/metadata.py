"""Fetch Hetzner's instance metadata (YAML) with bounded retries, and reduce it to the instance data."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

MAX_METADATA_BYTES = 1024 * 1024
DEFAULT_IPV6_GATEWAY = "fe80::1"


class MetadataError(Exception):
    """The metadata could not be fetched or parsed (an outage: retried)."""


class MetadataUnusable(MetadataError):
    """A well-formed metadata answer that cannot configure this server (not retried: asking again
    returns the same answer). The message names the key and what is missing or wrong."""


def _fetch_once(url: str, timeout: float) -> bytes:
    """One GET. Each socket wait is bounded by ``timeout`` and the whole answer by twice that, so a
    server that trickles bytes is cut off too."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/yaml, text/yaml, */*"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"answer not complete within {timeout:g}s")
            chunk = response.read1(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_METADATA_BYTES:
                raise MetadataError(f"answer larger than {MAX_METADATA_BYTES} bytes")
            chunks.append(chunk)


def parse_metadata(text: bytes | str, source: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetadataError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"{source}: metadata is not a mapping (got {type(doc).__name__})")
    return doc


def fetch_metadata(
    url: str,
    retries: int,
    backoff: float,
    backoff_max: float,
    timeout: float,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """GET and parse the metadata; up to ``retries`` attempts with exponential backoff capped at
    ``backoff_max``. Total time is at most ``retries * 2 * timeout + (retries - 1) * backoff_max``."""
    last_error = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            doc = parse_metadata(_fetch_once(url, timeout), url)
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            last_error = f"cannot connect: {exc.reason}"
        except TimeoutError as exc:
            last_error = f"timed out after {timeout:g}s ({exc})"
        except (OSError, MetadataError) as exc:
            last_error = str(exc)
        else:
            instance_data(doc)  # raises MetadataUnusable at once: the same answer would come again
            return doc
        log(f"metadata attempt {attempt}/{retries} from {url} failed: {last_error}")
        if attempt < retries:
            sleep(min(backoff_max, backoff * 2 ** (attempt - 1)))
    raise MetadataError(f"metadata from {url} unavailable after {retries} attempts: {last_error}")


# Normalizers for every address and name read from the metadata. nix/lib/instance-data.nix implements the
# same rules (tests/nix compares the two); a value that cannot be normalized is refused, naming the key.
_HEX4 = re.compile(r"[0-9a-f]{1,4}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV4 = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")


def _unusable(key: str, problem: str) -> MetadataUnusable:
    return MetadataUnusable(f"metadata {key}: {problem}")


def _ipv4(text: str, key: str) -> str:
    if not _IPV4.fullmatch(text) or any(int(octet) > 255 for octet in text.split(".")):
        raise _unusable(key, f"{text!r} is not an IPv4 address")
    return text


def _hextets(text: str, key: str) -> list[int]:
    """The eight 16-bit groups of an IPv6 address (RFC 4291 text forms, embedded IPv4 included)."""
    bad = _unusable(key, f"{text!r} is not an IPv6 address")

    def groups(part: str) -> list[int]:
        if part == "":
            return []
        items = part.split(":")
        values: list[int] = []
        for index, item in enumerate(items):
            if "." in item and index == len(items) - 1:
                octets = [int(o) for o in _ipv4(item, key).split(".")]
                values += [octets[0] * 256 + octets[1], octets[2] * 256 + octets[3]]
            elif _HEX4.fullmatch(item):
                values.append(int(item, 16))
            else:
                raise bad
        return values

    halves = text.split("::")
    if len(halves) > 2:
        raise bad
    if len(halves) == 1:
        result = groups(halves[0])
        if len(result) != 8:
            raise bad
        return result
    head, tail = groups(halves[0]), groups(halves[1])
    if len(head) + len(tail) > 7:
        raise bad
    return head + [0] * (8 - len(head) - len(tail)) + tail


def _render_ipv6(groups: list[int]) -> str:
    """RFC 5952: lower case, no leading zeros, the longest run (>= 2) of zero groups as '::'."""
    best_start, best_len, start = -1, 0, None
    for index, value in enumerate([*groups, 1]):
        if value == 0 and start is None:
            start = index
        elif value != 0 and start is not None:
            if index - start > best_len:
                best_start, best_len = start, index - start
            start = None
    text = [format(value, "x") for value in groups]
    if best_len < 2:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len :])


def _strip_zone(text: str) -> str:
    # A zone ("fe80::1%enp1s0") names an interface of the metadata's own numbering, which networkd does
    # not parse (Gateway=, Address=): every address is bound to the MAC-matched uplink instead.
    return text.split("%", 1)[0]


def normalize_ipv6(value: Any, key: str) -> str:
    """An IPv6 address in RFC 5952 form, zone dropped; raises MetadataUnusable naming ``key``."""
    if not isinstance(value, str) or not value.strip():
        raise _unusable(key, f"{value!r} is not an IPv6 address")
    return _render_ipv6(_hextets(_strip_zone(value.strip().lower()), key))


def normalize_ip(value: Any, key: str) -> str:
    """An IPv4 address as is, or an IPv6 address normalized as by ``normalize_ipv6``."""
    if isinstance(value, str) and ":" not in value:
        return _ipv4(value.strip(), key)
    return normalize_ipv6(value, key)


def prefix_length(value: Any, key: str) -> int:
    """A prefix length 1-128 from an integer, a string of digits or an IPv6 netmask (ffff:ffff::)."""
    if isinstance(value, int) and not isinstance(value, bool):
        length = value
    elif isinstance(value, str) and (digits := re.fullmatch(r"/?([0-9]+)", value.strip())):
        length = int(digits.group(1))
    elif isinstance(value, str) and ":" in value:
        bits = "".join(format(group, "016b") for group in _hextets(_strip_zone(value.strip().lower()), key))
        length = len(bits.rstrip("0"))
        if "0" in bits[:length]:
            raise _unusable(key, f"netmask {value!r} is not contiguous")
    else:
        raise _unusable(key, f"{value!r} is not a prefix length")
    if not 1 <= length <= 128:
        raise _unusable(key, f"prefix length {length} is not between 1 and 128")
    return length


def normalize_mac(value: Any, key: str) -> str:
    """A MAC address in lower case with colons (96:00:01:79:bc:40); '-' separators are accepted."""
    text = value.strip().lower().replace("-", ":") if isinstance(value, str) else ""
    if not _MAC.fullmatch(text):
        raise _unusable(key, f"{value!r} is not a MAC address")
    return text


def split_hostname(value: Any) -> tuple[str, str, str | None]:
    """``(hostname, host_name, domain)``: the server name (a trailing dot dropped), its first label
    (NixOS ``networking.hostName`` is one DNS label, nixos/modules/tasks/network-interfaces.nix) and
    the rest (``networking.domain``) or None. RFC 1123 labels only."""
    if not isinstance(value, str) or not value.strip():
        raise _unusable("'hostname'", "missing or empty")
    name = value.strip()
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _unusable("'hostname'", f"{value!r} is not a valid host name (RFC 1123 labels)")
    return name, labels[0], ".".join(labels[1:]) or None


def _is_default_route(route: dict[str, Any]) -> bool:
    network = str(route.get("network", route.get("destination", ""))).strip()
    netmask = str(route.get("netmask", route.get("prefix", "0"))).strip()
    return network in ("::", "::/0", "default") and netmask in ("0", "::", "")


def _ipv6_subnet(subnet: dict[str, Any]) -> bool:
    if subnet.get("ipv6") is True or subnet.get("type") in ("static6", "dhcp6"):
        return True
    return subnet.get("type") == "static" and ":" in str(subnet.get("address", ""))


def _static_ipv6(subnet: Any) -> bool:
    return isinstance(subnet, dict) and _ipv6_subnet(subnet) and subnet.get("type") != "dhcp6"


def _dhcp4(subnet: Any) -> bool:
    return isinstance(subnet, dict) and not _ipv6_subnet(subnet) and subnet.get("type") in ("dhcp", "dhcp4")


def _absent(value: Any) -> bool:
    return value is None or value == ""


def _ipv6_from_subnet(subnet: dict[str, Any], where: str) -> dict[str, Any]:
    raw = subnet.get("address")
    if not isinstance(raw, str) or not raw.strip():
        raise _unusable(f"{where}.address", f"{raw!r} is not an IPv6 address")
    address, _, suffix = raw.strip().partition("/")
    mask = subnet.get("netmask", subnet.get("prefix"))
    if suffix:
        length = prefix_length(suffix, f"{where}.address")
    elif not _absent(mask):
        length = prefix_length(mask, f"{where}.netmask")
    else:
        length = 64
    gateway, gateway_key = subnet.get("gateway"), f"{where}.gateway"
    if _absent(gateway):
        routes = subnet.get("routes")
        routes = routes if isinstance(routes, list) else []
        defaults = [r for r in routes if isinstance(r, dict) and _is_default_route(r)]
        gateway = defaults[0].get("gateway") if defaults else None
        gateway_key = f"{where}.routes[default].gateway"
    nameservers = subnet.get("dns_nameservers")
    if _absent(nameservers):
        nameservers = []
    if not isinstance(nameservers, list):
        raise _unusable(f"{where}.dns_nameservers", f"must be a list of addresses, got {nameservers!r}")
    return {
        "address": normalize_ipv6(address, f"{where}.address"),
        "prefix_length": length,
        "gateway": DEFAULT_IPV6_GATEWAY if _absent(gateway) else normalize_ipv6(gateway, gateway_key),
        "nameservers": [
            normalize_ip(server, f"{where}.dns_nameservers[{index}]") for index, server in enumerate(nameservers)
        ],
    }


def instance_data(meta: dict[str, Any]) -> dict[str, Any]:
    """The facts the host needs, from either network-config layout Hetzner has served: IPv6 as a second
    subnet of ``eth0``, or as a separate ``eth0:0`` entry (gateway given directly or as a default route).

    Every address and name is normalized (see the helpers above). Raises MetadataUnusable, naming the
    key, for an answer that cannot configure the server: no hostname, no interface, no public IPv4
    (dhcp) or IPv6 (static) subnet, no MAC address for it, or a value that is not an address."""
    hostname, host_name, domain = split_hostname(meta.get("hostname"))
    network = meta.get("network-config")
    if not isinstance(network, dict):
        raise _unusable("'network-config'", "missing: the answer does not describe the server's network")
    if network.get("version", 1) != 1:
        raise _unusable("'network-config.version'", f"{network.get('version')!r} is not supported (version 1)")
    entries = network.get("config")
    if not isinstance(entries, list) or not entries:
        raise _unusable(
            "'network-config.config'", "lists no network interface: the server has no public IPv4 or IPv6 network"
        )
    physical = [e for e in entries if isinstance(e, dict) and e.get("type", "physical") == "physical"]

    def base(entry: dict[str, Any]) -> str:
        return str(entry.get("name", "")).split(":")[0]

    def with_subnet(pred: Any) -> dict[str, Any] | None:
        return next((e for e in physical if isinstance(e.get("subnets"), list) and any(map(pred, e["subnets"]))), None)

    v6_entry, v4_entry = with_subnet(_static_ipv6), with_subnet(_dhcp4)
    uplink = v6_entry or v4_entry
    if uplink is None:
        raise _unusable(
            "'network-config.config'", "has no public IPv4 (dhcp) or IPv6 (static) subnet on a physical interface"
        )
    name = str(uplink.get("name", ""))
    # The older layout's "eth0:0" alias carries no MAC address: it is eth0's.
    mac = uplink.get("mac_address") or next(
        (e.get("mac_address") for e in physical if base(e) == base(uplink) and e.get("mac_address")), None
    )
    if _absent(mac):
        raise _unusable(f"'network-config' entry {name!r}", "has no mac_address")
    ipv6 = None
    if v6_entry is not None:
        subnet = next(s for s in v6_entry["subnets"] if _static_ipv6(s))
        ipv6 = _ipv6_from_subnet(subnet, f"'network-config' entry {str(v6_entry.get('name', ''))!r} subnet")
    public_ipv4 = meta.get("public-ipv4")
    return {
        "hostname": hostname,
        "host_name": host_name,
        "domain": domain,
        "instance_id": meta.get("instance-id"),
        "region": meta.get("region"),
        "availability_zone": meta.get("availability-zone"),
        "public_ipv4": None if _absent(public_ipv4) else _ipv4(str(public_ipv4).strip(), "'public-ipv4'"),
        "mac_address": normalize_mac(mac, f"'network-config' entry {name!r} mac_address"),
        "ipv4_dhcp": v4_entry is not None,
        "ipv6": ipv6,
        "public_keys": [k for k in meta.get("public-keys") or [] if isinstance(k, str)],
    }
