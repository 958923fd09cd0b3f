"""Fetch Hetzner's instance metadata (YAML) with bounded retries, and reduce it to the instance data."""

from __future__ import annotations

import ipaddress
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

MAX_METADATA_BYTES = 1024 * 1024
DEFAULT_IPV6_GATEWAY = "fe80::1"


class MetadataError(Exception):
    """The metadata could not be fetched, or it does not describe this server's network."""


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
            instance_data(doc)  # an answer without usable network data counts as a failed attempt
            return doc
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            last_error = f"cannot connect: {exc.reason}"
        except TimeoutError as exc:
            last_error = f"timed out after {timeout:g}s ({exc})"
        except (OSError, MetadataError) as exc:
            last_error = str(exc)
        log(f"metadata attempt {attempt}/{retries} from {url} failed: {last_error}")
        if attempt < retries:
            sleep(min(backoff_max, backoff * 2 ** (attempt - 1)))
    raise MetadataError(f"metadata from {url} unavailable after {retries} attempts: {last_error}")


def _is_default_route(route: dict[str, Any]) -> bool:
    network = str(route.get("network", route.get("destination", ""))).strip()
    netmask = str(route.get("netmask", route.get("prefix", "0"))).strip()
    return network in ("::", "::/0", "default") and netmask in ("0", "::", "")


def _ipv6_subnet(subnet: dict[str, Any]) -> bool:
    if subnet.get("ipv6") is True or subnet.get("type") in ("static6", "dhcp6"):
        return True
    return subnet.get("type") == "static" and ":" in str(subnet.get("address", ""))


def _ipv6_from_subnet(subnet: dict[str, Any], where: str) -> dict[str, Any]:
    address = str(subnet.get("address", ""))
    netmask = subnet.get("netmask", subnet.get("prefix"))
    if "/" not in address and netmask is not None:
        address = f"{address}/{netmask}"
    try:
        interface = ipaddress.IPv6Interface(address if "/" in address else f"{address}/64")
    except ValueError:
        raise MetadataError(f"{where}: IPv6 address {address!r} is not valid") from None
    gateway = subnet.get("gateway")
    if gateway is None:
        defaults = [r for r in subnet.get("routes") or [] if isinstance(r, dict) and _is_default_route(r)]
        gateway = defaults[0].get("gateway") if defaults else DEFAULT_IPV6_GATEWAY
    try:
        gateway = str(ipaddress.IPv6Address(str(gateway)))
    except ValueError:
        raise MetadataError(f"{where}: IPv6 gateway {gateway!r} is not valid") from None
    nameservers = subnet.get("dns_nameservers") or []
    if not isinstance(nameservers, list) or not all(isinstance(n, str) for n in nameservers):
        raise MetadataError(f"{where}: dns_nameservers must be a list of addresses")
    return {
        "address": str(interface.ip),
        "prefix_length": interface.network.prefixlen,
        "gateway": gateway,
        "nameservers": nameservers,
    }


def instance_data(meta: dict[str, Any]) -> dict[str, Any]:
    """The facts the host needs, from either network-config layout Hetzner has served: IPv6 as a second
    subnet of ``eth0``, or as a separate ``eth0:0`` entry (gateway given directly or as a default route)."""
    hostname = meta.get("hostname")
    if not isinstance(hostname, str) or not hostname:
        raise MetadataError("metadata has no 'hostname'")
    network = meta.get("network-config")
    entries = network.get("config") if isinstance(network, dict) else None
    if not isinstance(entries, list) or not entries:
        raise MetadataError("metadata has no 'network-config.config' list")
    physical = [e for e in entries if isinstance(e, dict) and e.get("type", "physical") == "physical"]
    macs = {str(e.get("name", "")).split(":")[0]: e.get("mac_address") for e in physical}
    mac = ipv4_dhcp = ipv6 = None
    for entry in physical:
        name = str(entry.get("name", ""))
        entry_mac = entry.get("mac_address") or macs.get(name.split(":")[0])
        for subnet in entry.get("subnets") or []:
            if not isinstance(subnet, dict):
                continue
            if _ipv6_subnet(subnet):
                if ipv6 is None and subnet.get("type") != "dhcp6":
                    ipv6 = _ipv6_from_subnet(subnet, f"network-config entry {name!r}")
                    mac = mac or entry_mac
            elif subnet.get("type") == "dhcp" or subnet.get("type") == "dhcp4":
                ipv4_dhcp = True
                mac = mac or entry_mac
    mac = mac or next((m for m in macs.values() if m), None)
    if not isinstance(mac, str) or len(mac.split(":")) != 6:
        raise MetadataError(f"metadata has no valid 'mac_address' for the public interface (got {mac!r})")
    return {
        "hostname": hostname,
        "instance_id": meta.get("instance-id"),
        "region": meta.get("region"),
        "availability_zone": meta.get("availability-zone"),
        "public_ipv4": meta.get("public-ipv4") or None,
        "mac_address": mac.lower(),
        "ipv4_dhcp": bool(ipv4_dhcp),
        "ipv6": ipv6,
        "public_keys": [k for k in meta.get("public-keys") or [] if isinstance(k, str)],
    }
