"""The stack program: stack configuration in, a fleet declared, per-host outputs exported.

`__main__.py` calls `main()` under `pulumi up`; the demo runs `declare()` through the local engine.
Stack config (namespace `nix-dabei`):

    nix-dabei:image:      {flake: <flake ref>, attr: <output attribute, may hold {system}>,
                           attrs: {<system>: <output attribute>}, nixArgs: [..]}
    nix-dabei:hosts:      [{name, serverType, location, flake, sshKeys, labels, firewallIds, disk, reinstall,
                            existingServer, networks, placementGroupId, publicNets, backups, deleteProtection,
                            rebuildProtection, keepDisk, shutdownBeforeDeletion, ignoreRemoteFirewallIds}]
    nix-dabei:deadlines:  {rescue: s, install: s, firstboot: s}
    nix-dabei:healthChecks: [{name, command | http | tcp, expectStatus, withinSeconds, timeoutSeconds}]
    nix-dabei:rollout:    {maxUnavailable: 1 | "25%", confirmSeconds: s}
    nix-dabei:sshPort:    22 (only for the local simulator)
    nix-dabei:evaluate:   true (false: do not evaluate the hosts' systems at preview)
    nix-dabei:sendInputs: local | all (which inputs of the host flakes the deployer sends to the hosts)
    hcloud:token:         secret
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import pulumi
import pulumi_command as command
import pulumi_hcloud as hcloud

from . import server_options
from .component import Deadlines, Fleet, FleetArgs, HostArgs, ImageArgs, InvalidArgs
from .flakes import SEND_INPUTS
from .rollout import HealthCheck, Rollout

Problems = list[tuple[str, str]]

# `pulumi config set --path` stores `2` as a number and `true`/`false` as booleans; top-level keys are
# always strings (Pulumi CLI reference, `pulumi config set`). Each reader takes what the user meant.
_QUOTE = "quote it in Pulumi.<stack>.yaml ('{v}') or set it with `pulumi config set --path --type string`"


def _typed_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return f"the number {value}" if isinstance(value, int | float) else type(value).__name__


def _text(prop: str, value: Any, problems: Problems) -> Any:
    """A string setting; a number or boolean in its place is refused, saying how to store it as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        text = str(value).lower() if isinstance(value, bool) else str(value)
        problems.append((prop, f"expected a string, got {_typed_scalar(value)}; {_QUOTE.format(v=text)}"))
    else:
        problems.append((prop, f"expected a string, got {_typed_scalar(value)}"))
    return None


def _word(prop: str, value: Any, problems: Problems) -> Any:
    """A string where a number or boolean stands for its text (a label value, a nix argument)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # The YAML number may not be what was typed (1.10 reads as 1.1): only the user can say.
        problems.append((prop, f"expected a string, got {_typed_scalar(value)}; {_QUOTE.format(v=value)}"))
        return None
    return _text(prop, value, problems)


def _list(prop: str, value: Any, problems: Problems, item: Any) -> list[Any]:
    if not isinstance(value, list):
        problems.append((prop, f"expected a list, got {_typed_scalar(value)}"))
        return []
    return [item(f"{prop}[{i}]", v, problems) for i, v in enumerate(value)]


def _ssh_key(prop: str, value: Any, problems: Problems) -> Any:
    """A pasted public key or key name (text), or a Hetzner SSH key ID (a number)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bool | float):
        text = str(value).lower() if isinstance(value, bool) else str(value)
        reason = f"expected a public key, a key name or a key ID, got {_typed_scalar(value)}"
        problems.append((prop, f"{reason}; for a key named {text!r}, {_QUOTE.format(v=text)}"))
        return None
    return _text(prop, value, problems)


def _labels(prop: str, value: Any, problems: Problems) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.append((prop, f"expected a map of label names to values, got {_typed_scalar(value)}"))
        return {}
    return {k: _word(f"{prop}.{k}", v, problems) for k, v in value.items()}


def _firewall_id(prop: str, value: Any, problems: Problems) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    problems.append((prop, f"expected a firewall ID (a positive integer), got {value!r}"))
    return None


def _seconds(prop: str, value: Any, problems: Problems) -> Any:
    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            seconds = float(value)
    if seconds is None or not math.isfinite(seconds):
        problems.append((prop, f"expected a finite number of seconds such as 900, got {value!r}"))
        return None
    return seconds


def _port(prop: str, value: Any, problems: Problems) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    problems.append((prop, f"expected a port number between 1 and 65535, got {value!r}"))
    return 22


def _whole_number(prop: str, value: Any, problems: Problems, what: str) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    problems.append((prop, f"expected {what}, got {value!r}"))
    return None


_CHECK_KEYS: dict[str, tuple[str, Any]] = {
    "name": ("name", _text),
    "command": ("command", _text),
    "http": ("http", _text),
    "tcp": ("tcp", lambda p, v, pr: _whole_number(p, v, pr, "a port number")),
    "expectStatus": ("expect_status", lambda p, v, pr: _whole_number(p, v, pr, "an HTTP status code such as 200")),
    "withinSeconds": ("within_seconds", lambda p, v, pr: _seconds(p, v, pr)),
    "timeoutSeconds": ("timeout_seconds", lambda p, v, pr: _seconds(p, v, pr)),
}


def _health_check(prop: str, value: Any, problems: Problems) -> Any:
    """`{name, command | http | tcp, expectStatus, withinSeconds, timeoutSeconds}`; the component checks
    the combination (exactly one of command, http, tcp) and the ranges."""
    if not isinstance(value, dict):
        problems.append((prop, f"expected an object {{command | http | tcp, ...}}, got {_typed_scalar(value)}"))
        return None
    problems += [(f"{prop}.{k}", "unknown key") for k in sorted(set(value) - set(_CHECK_KEYS))]
    kwargs = {}
    for key, (attr, read) in _CHECK_KEYS.items():
        if key in value:
            kwargs[attr] = read(f"{prop}.{key}", value[key], problems)
    return HealthCheck(**{k: v for k, v in kwargs.items() if v is not None})


def _health_checks(prop: str, value: Any, problems: Problems) -> list[Any]:
    return _list(prop, value, problems, _health_check)


def _max_unavailable(prop: str, value: Any, problems: Problems) -> Any:
    """A count (a number or digit string) or a percentage string such as '25%'."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value.strip() if isinstance(value, str) else value
    problems.append((prop, f"expected a number of hosts or a percentage such as '25%', got {value!r}"))
    return None


def _bool(prop: str, value: Any, problems: Problems) -> Any:
    """A boolean; the strings true/false too (`pulumi config set` without --path stores text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    problems.append((prop, f"expected true or false, got {value!r}"))
    return None


def _id(what: str) -> Any:
    def read(prop: str, value: Any, problems: Problems) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
            return int(value)
        problems.append((prop, f"expected a {what} ID (a positive integer), got {value!r}"))
        return None

    return read


def _object(fields: dict[str, tuple[str, Any]], args_type: Any) -> Any:
    """A config object with pulumi-hcloud's camelCase keys, read into its `*Args` input type."""

    def read(prop: str, value: Any, problems: Problems) -> Any:
        if not isinstance(value, dict):
            problems.append((prop, f"expected an object with keys {', '.join(fields)}, got {_typed_scalar(value)}"))
            return None
        problems.extend((f"{prop}.{k}", "unknown key") for k in sorted(set(value) - set(fields)))
        kwargs = {
            attr: read_one(f"{prop}.{k}", value[k], problems) for k, (attr, read_one) in fields.items() if k in value
        }
        return args_type(**kwargs)

    return read


_NETWORK_KEYS: dict[str, tuple[str, Any]] = {
    "networkId": ("network_id", _id("network")),
    "subnetId": ("subnet_id", _text),
    "ip": ("ip", _text),
    "aliasIps": ("alias_ips", lambda p, v, pr: _list(p, v, pr, _text)),
}
_PUBLIC_NET_KEYS: dict[str, tuple[str, Any]] = {
    "ipv4Enabled": ("ipv4_enabled", _bool),
    "ipv6Enabled": ("ipv6_enabled", _bool),
    "ipv4": ("ipv4", _id("primary IP")),
    "ipv6": ("ipv6", _id("primary IP")),
}
# Settings of `hcloud.Server` the component owns: accepted as keys only to be refused with the reason.
_OWNED_KEYS = {key: (attr, lambda p, v, pr: v) for attr, key in server_options.OWNED_CONFIG.items()}

_HOST_KEYS: dict[str, tuple[str, Any]] = {
    "name": ("name", _text),
    "serverType": ("server_type", _text),
    "location": ("location", _text),
    "flake": ("flake", _text),
    "sshKeys": ("ssh_keys", lambda p, v, pr: _list(p, v, pr, _ssh_key)),
    "labels": ("labels", _labels),
    "firewallIds": ("firewall_ids", lambda p, v, pr: _list(p, v, pr, _firewall_id)),
    "disk": ("disk", _text),
    "reinstall": ("reinstall", _text),
    "healthChecks": ("health_checks", _health_checks),
    "existingServer": ("existing_server", _id("server")),
    # pulumi-hcloud's `hcloud.Server` inputs, passed through.
    "networks": ("networks", lambda p, v, pr: _list(p, v, pr, _object(_NETWORK_KEYS, hcloud.ServerNetworkArgs))),
    "placementGroupId": ("placement_group_id", _id("placement group")),
    "publicNets": (
        "public_nets",
        lambda p, v, pr: _list(p, v, pr, _object(_PUBLIC_NET_KEYS, hcloud.ServerPublicNetArgs)),
    ),
    **{key: (attr, _bool) for attr, key in server_options.PASS_THROUGH.items() if attr in server_options.BOOLEANS},
    **_OWNED_KEYS,
}
_REQUIRED_HOST_KEYS = ("name", "flake")
_NEW_SERVER_KEYS = ("serverType", "location")
_CONFIG_NAMES = (
    {attr: key for key, (attr, _) in {**_HOST_KEYS, **_CHECK_KEYS}.items()}
    | {attr: key for key, (attr, _) in {**_NETWORK_KEYS, **_PUBLIC_NET_KEYS}.items()}
    | {"nix_args": "nixArgs", "ssh_port": "sshPort"}
    | {"max_unavailable": "maxUnavailable", "confirm_seconds": "confirmSeconds"}
)


def config_key(prop: str, ns: str = "nix-dabei") -> str:
    """The stack config key of a component property: `hosts[0].ssh_keys[1]` -> `nix-dabei:hosts[0].sshKeys[1]`."""
    # Only property names: at the start, after `image.`/`rollout.` or after a list index (never a label's key).
    renamed = re.sub(r"(^image\.|^rollout\.|^|\]\.)([a-z0-9_]+)", lambda m: m[1] + _CONFIG_NAMES.get(m[2], m[2]), prop)
    return f"{ns}:{renamed}"


def fleet_args_from_config(
    image: Any,
    hosts: Any,
    deadlines: Any = None,
    ssh_port: Any = None,
    ns: str = "nix-dabei",
    *,
    evaluate: Any = None,
    health_checks: Any = None,
    rollout: Any = None,
    send_inputs: Any = None,
) -> FleetArgs:
    """Build typed args from stack config values, naming the config key of every wrong value.

    Accepted beyond the exact types (what `pulumi config set --path` stores): an SSH key ID as a number,
    label values and `nixArgs` items that are numbers or booleans (as their text), firewall IDs and
    `sshPort` as digit strings, deadlines as numeric strings. Raises InvalidArgs listing every problem."""
    problems: Problems = []
    if not isinstance(image, dict):
        problems.append((f"{ns}:image", "expected an object {flake, attr, attrs, nixArgs}"))
        image = {}
    unknown = set(image) - {"flake", "attr", "attrs", "nixArgs"}
    problems += [(f"{ns}:image.{k}", "unknown key") for k in sorted(unknown)]
    image_args = ImageArgs(
        flake=_text(f"{ns}:image.flake", image.get("flake"), problems),
        attr=_text(f"{ns}:image.attr", image.get("attr", "packages.{system}.image"), problems),
        nix_args=_list(f"{ns}:image.nixArgs", image.get("nixArgs", []), problems, _word),
        attrs=_image_attrs(f"{ns}:image.attrs", image.get("attrs", {}), problems),
    )
    host_args = []
    if not isinstance(hosts, list) or not hosts:
        problems.append((f"{ns}:hosts", "expected a non-empty list of hosts"))
        hosts = []
    for i, host in enumerate(hosts):
        where = f"{ns}:hosts[{i}]"
        if not isinstance(host, dict):
            problems.append((where, f"expected an object, got {type(host).__name__}"))
            continue
        problems += [(f"{where}.{k}", "unknown key") for k in sorted(set(host) - set(_HOST_KEYS))]
        problems += [(f"{where}.{k}", "required") for k in _REQUIRED_HOST_KEYS if k not in host]
        if "existingServer" not in host:
            problems += [(f"{where}.{k}", "required (or existingServer)") for k in _NEW_SERVER_KEYS if k not in host]
        kwargs = {
            attr: read(f"{where}.{key}", host[key], problems) for key, (attr, read) in _HOST_KEYS.items() if key in host
        }
        if all(k in host for k in _REQUIRED_HOST_KEYS):
            host_args.append(HostArgs(**kwargs))
    dl = Deadlines()
    if deadlines is not None:
        if not isinstance(deadlines, dict):
            problems.append((f"{ns}:deadlines", "expected an object {rescue, install, firstboot}"))
        else:
            problems += [(f"{ns}:deadlines.{k}", "unknown key") for k in sorted(set(deadlines) - set(vars(dl)))]
            for k in vars(dl):
                if k in deadlines:
                    setattr(dl, k, _seconds(f"{ns}:deadlines.{k}", deadlines[k], problems))
    port = 22 if ssh_port is None else _port(f"{ns}:sshPort", ssh_port, problems)
    checks = [] if health_checks is None else _health_checks(f"{ns}:healthChecks", health_checks, problems)
    plan = Rollout()
    if rollout is not None:
        if not isinstance(rollout, dict):
            problems.append((f"{ns}:rollout", "expected an object {maxUnavailable, confirmSeconds}"))
        else:
            known = {"maxUnavailable", "confirmSeconds"}
            problems += [(f"{ns}:rollout.{k}", "unknown key") for k in sorted(set(rollout) - known)]
            where = f"{ns}:rollout"
            if "maxUnavailable" in rollout:
                plan.max_unavailable = _max_unavailable(f"{where}.maxUnavailable", rollout["maxUnavailable"], problems)
            if "confirmSeconds" in rollout:
                plan.confirm_seconds = _seconds(f"{where}.confirmSeconds", rollout["confirmSeconds"], problems)
    evaluate_systems = True if evaluate is None else _bool(f"{ns}:evaluate", evaluate, problems)
    sent = "local" if send_inputs is None else _text(f"{ns}:sendInputs", send_inputs, problems)
    if sent is not None and sent not in SEND_INPUTS:
        problems.append((f"{ns}:sendInputs", f"expected one of {', '.join(SEND_INPUTS)}, got {sent!r}"))
    if problems:
        raise InvalidArgs(problems)
    return FleetArgs(
        hosts=host_args,
        image=image_args,
        deadlines=dl,
        ssh_port=port,
        health_checks=checks,
        rollout=plan,
        evaluate=evaluate_systems,
        send_inputs=sent,
    )


_SYSTEMS = ("x86_64-linux", "aarch64-linux")


def _image_attrs(prop: str, value: Any, problems: Problems) -> dict[str, str]:
    if not isinstance(value, dict):
        problems.append((prop, f"expected a map of Nix system to output attribute, got {_typed_scalar(value)}"))
        return {}
    for system in value:
        if system not in _SYSTEMS:
            problems.append((f"{prop}.{system}", f"expected a system of Hetzner's servers: {', '.join(_SYSTEMS)}"))
    return {k: _text(f"{prop}.{k}", v, problems) for k, v in value.items()}


def exports(fleet: Fleet) -> dict[str, Any]:
    """What the stack exports: the image and, per host, its addresses, known_hosts line and system."""
    hosts = {
        name: {
            "ipv4": host.ipv4,
            "ipv6": host.ipv6,
            "known_hosts": host.known_hosts,
            "system": host.system,
            "recipients": host.recipients,
        }
        for name, host in fleet.hosts.items()
    }
    images = {system: image.out_path for system, image in fleet.images.items()}
    return {"image": fleet.image.out_path, "images": images, "hosts": hosts}


def fleet(args: FleetArgs, name: str = "fleet") -> Fleet:
    """Declare the fleet from stack config; its errors name the config keys (`nix-dabei:hosts[0].sshKeys[1]`)."""
    try:
        return Fleet(name, args)
    except InvalidArgs as exc:
        raise InvalidArgs([(config_key(prop), reason) for prop, reason in exc.problems]) from None


def declare(args: FleetArgs, name: str = "fleet") -> dict[str, Any]:
    """Declare the fleet, and on each host a command that runs once it converged; returns the exports."""
    declared = fleet(args, name)
    for host_name, host in declared.hosts.items():
        # After convergence, further steps run over SSH with the pinned host key (checking stays on).
        command.remote.Command(
            f"{host_name}-uname",
            connection=host.connection_args(),
            create="uname -a",
            opts=pulumi.ResourceOptions(parent=host, depends_on=[declared.first_boot]),
        )
    return exports(declared)


def main() -> None:
    cfg = pulumi.Config("nix-dabei")
    args = fleet_args_from_config(
        cfg.require_object("image"),
        cfg.require_object("hosts"),
        cfg.get_object("deadlines"),
        cfg.get("sshPort"),
        evaluate=cfg.get_object("evaluate"),
        send_inputs=cfg.get_object("sendInputs"),
        health_checks=cfg.get_object("healthChecks"),
        rollout=cfg.get_object("rollout"),
    )
    for key, value in declare(args).items():
        pulumi.export(key, value)
