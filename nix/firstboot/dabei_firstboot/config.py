"""Configuration of the first-boot program: a JSON file, every key optional (defaults fit a NixOS host)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/nix-dabei/config.json"
CONFIG_ENV = "NIX_DABEI_CONFIG"
# The only address Hetzner serves the metadata on, IPv6-only servers included: there is no IPv6 metadata
# address, and servers without a public IPv4 still reach this one link-locally through the image's DHCPv4
# network (coreos/afterburn, src/providers/hetzner/mod.rs, on cloud-init's try of fe80::a9fe:a9fe).
DEFAULT_METADATA_URL = "http://169.254.169.254/hetzner/v1/metadata"
DEFAULT_REBUILD_COMMAND = ("nixos-rebuild", "switch", "--flake", "{flake}#{hostname}")
# A rollback does what `nixos-rebuild switch --rollback` does, to a generation named exactly: point the
# system profile at it, then activate it with its own switch-to-configuration, which also installs the
# boot loader with the profile's current generation as the default (nixpkgs
# pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/nix.py: rollback(), switch_to_configuration()).
DEFAULT_SWITCH_GENERATION_COMMAND = (
    "nix-env",
    "--profile",
    "/nix/var/nix/profiles/system",
    "--switch-generation",
    "{generation}",
)
DEFAULT_ACTIVATE_COMMAND = ("{system}/bin/switch-to-configuration", "switch")

# Paths relative to ``root``: the contract with the component and the simulator (docs/architecture.md).
STATE_DIR = "var/lib/nix-dabei"
STATUS_FILE = f"{STATE_DIR}/status.json"
PENDING_MARKER = f"{STATE_DIR}/pending"
FLAKE_FILE = f"{STATE_DIR}/flake"
SEED_RECORD = f"{STATE_DIR}/seed.json"
PERSISTENT_INSTANCE_DATA = f"{STATE_DIR}/instance-data.json"
RUNTIME_INSTANCE_DATA = "run/nix-dabei/instance-data.json"
LOG_FILE = "var/log/nix-dabei/firstboot.log"
CURRENT_SYSTEM = "run/current-system"
# The system profile: `system` -> `system-<N>-link` -> the store path of generation N.
SYSTEM_PROFILE = "nix/var/nix/profiles/system"
# The switch that waits for the deployer's confirmation (see rollback.py).
CONFIRM_RECORD = f"{STATE_DIR}/confirm.json"
# The host's identity lives on the persistent dataset (safe/var), not on local/root, so rolling the root
# dataset back to its blank snapshot keeps the host key and root's keys (sshd is pointed here by
# nix/modules/firstboot.nix).
SSH_DIR = f"{STATE_DIR}/ssh"
HOST_KEY = f"{SSH_DIR}/ssh_host_ed25519_key"
ROOT_AUTHORIZED_KEYS = f"{SSH_DIR}/authorized_keys.d/root"
NETWORKD_FILE = "run/systemd/network/10-nix-dabei-uplink.network"
# Flake sources the deployer sends (`nix-dabei receive`), one directory per source: the host builds
# `path:/var/lib/nix-dabei/flakes/<id>?narHash=...`.
FLAKES_DIR = f"{STATE_DIR}/flakes"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad value."""


@dataclass(frozen=True)
class Config:
    root: Path = Path("/")
    metadata_url: str = DEFAULT_METADATA_URL
    metadata_retries: int = 20
    metadata_backoff_seconds: float = 1.0
    metadata_backoff_max_seconds: float = 15.0
    metadata_timeout_seconds: float = 5.0
    rebuild_command: tuple[str, ...] = DEFAULT_REBUILD_COMMAND
    rebuild_retries: int = 3
    rebuild_backoff_seconds: float = 10.0
    rebuild_timeout_seconds: float = 3600.0
    seed_device: str = "auto"
    boot_id_path: Path = Path("/proc/sys/kernel/random/boot_id")
    journal_command: tuple[str, ...] | None = None
    network_reload_command: tuple[str, ...] | None = ("networkctl", "reload")
    switch_wait_command: tuple[str, ...] | None = None
    # How long a rebuild waits for the flake source the deployer sends after the boot.
    source_wait_seconds: float = 1800.0
    # The ZFS pool `nix-dabei grow` expands after growing its partition; None: only the partition.
    grow_pool: str | None = None
    switch_generation_command: tuple[str, ...] = DEFAULT_SWITCH_GENERATION_COMMAND
    activate_command: tuple[str, ...] = DEFAULT_ACTIVATE_COMMAND
    # Starts the confirmation watchdog outside the SSH session ({token}: the switch's token; the argv of
    # `nix-dabei watchdog` follows it). None: the program detaches the watchdog itself (new session).
    watchdog_command: tuple[str, ...] | None = None
    # The host's `nix-store` (with any store options) and the decompressor of the inputs the deployer sends
    # (`nix-dabei receive --inputs`: a zstd-compressed `nix-store --export` stream).
    nix_store_command: tuple[str, ...] = ("nix-store",)
    decompress_command: tuple[str, ...] = ("zstd", "-dc")
    source: str = field(default="(defaults)", compare=False)

    def path(self, relative: str) -> Path:
        """A path of the contract, under ``root``."""
        return self.root / relative


_INT_KEYS = {"metadata_retries", "rebuild_retries"}
_FLOAT_KEYS = {
    "metadata_backoff_seconds",
    "metadata_backoff_max_seconds",
    "metadata_timeout_seconds",
    "rebuild_backoff_seconds",
    "rebuild_timeout_seconds",
    "source_wait_seconds",
}
_ARGV_KEYS = {
    "rebuild_command",
    "journal_command",
    "network_reload_command",
    "switch_wait_command",
    "switch_generation_command",
    "activate_command",
    "watchdog_command",
    "nix_store_command",
    "decompress_command",
}
_NULLABLE_ARGV_KEYS = {"journal_command", "network_reload_command", "switch_wait_command", "watchdog_command"}
# Placeholders an argv must contain.
_REQUIRED_PLACEHOLDERS = {
    "rebuild_command": "{flake}",
    "switch_generation_command": "{generation}",
    "activate_command": "{system}",
}


def _argv(key: str, value: Any, source: str) -> tuple[str, ...] | None:
    if value is None and key in _NULLABLE_ARGV_KEYS:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ConfigError(f"{source}: '{key}' must be a non-empty list of non-empty strings")
    return tuple(value)


def config_from_dict(raw: Any, source: str) -> Config:
    """Build a Config from the parsed JSON object, naming the file and key of any bad value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the configuration must be a JSON object")
    known = {f.name for f in fields(Config)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown configuration keys {unknown}")
    values: dict[str, Any] = {"source": source}
    for key, value in raw.items():
        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{source}: '{key}' must be an integer >= 1, got {value!r}")
            values[key] = value
        elif key in _FLOAT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{source}: '{key}' must be a number >= 0, got {value!r}")
            values[key] = float(value)
        elif key in _ARGV_KEYS:
            values[key] = _argv(key, value, source)
        elif key in {"root", "boot_id_path"}:
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"{source}: '{key}' must be an absolute path, got {value!r}")
            values[key] = Path(value)
        elif key == "metadata_url":
            if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                raise ConfigError(f"{source}: 'metadata_url' must be an http(s) URL, got {value!r}")
            values[key] = value
        elif key == "grow_pool":
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z][\w.:-]*", value)):
                raise ConfigError(f"{source}: 'grow_pool' must be a ZFS pool name or null, got {value!r}")
            values[key] = value
        elif key == "seed_device":
            if not isinstance(value, str) or not (value == "auto" or value.startswith("/")):
                raise ConfigError(f"{source}: 'seed_device' must be 'auto' or an absolute path, got {value!r}")
            values[key] = value
    for key, placeholder in _REQUIRED_PLACEHOLDERS.items():
        if key in values and placeholder not in " ".join(values[key]):
            raise ConfigError(f"{source}: '{key}' must contain the '{placeholder}' placeholder")
    return Config(**values)


def load_config(path: str | None = None) -> Config:
    """Load the configuration from ``path``, else $NIX_DABEI_CONFIG, else the default path if it exists."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if chosen is None:
        if not Path(DEFAULT_CONFIG_PATH).exists():
            return Config()
        chosen = DEFAULT_CONFIG_PATH
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {chosen}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid JSON: {exc}") from None
    return config_from_dict(raw, chosen)
