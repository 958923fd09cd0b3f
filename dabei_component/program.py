"""The stack program: stack configuration in, a fleet declared, per-host outputs exported.

`__main__.py` calls `main()` under `pulumi up`; the demo runs `declare()` through the local engine.
Stack config (namespace `nix-dabei`):

    nix-dabei:image:      {flake: <flake ref>, attr: <output attribute>, nixArgs: [..]}
    nix-dabei:hosts:      [{name, serverType, location, flake, sshKeys, labels, firewallIds, disk, reinstall}]
    nix-dabei:deadlines:  {rescue: s, install: s, firstboot: s}
    nix-dabei:sshPort:    22 (only for the local simulator)
    hcloud:token:         secret
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_command as command

from .component import Deadlines, Fleet, FleetArgs, HostArgs, ImageArgs, InvalidArgs

_HOST_KEYS = {
    "name": ("name", str),
    "serverType": ("server_type", str),
    "location": ("location", str),
    "flake": ("flake", str),
    "sshKeys": ("ssh_keys", list),
    "labels": ("labels", dict),
    "firewallIds": ("firewall_ids", list),
    "disk": ("disk", str),
    "reinstall": ("reinstall", str),
}
_REQUIRED_HOST_KEYS = ("name", "serverType", "location", "flake")


def _typed(prop: str, value: Any, kind: type, problems: list[tuple[str, str]]) -> Any:
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        problems.append((prop, f"expected {kind.__name__}, got {type(value).__name__} {value!r}"))
        return None
    return value


def fleet_args_from_config(
    image: Any, hosts: Any, deadlines: Any = None, ssh_port: Any = None, ns: str = "nix-dabei"
) -> FleetArgs:
    """Build typed args from stack config values, naming the config key of every wrong value."""
    problems: list[tuple[str, str]] = []
    if not isinstance(image, dict):
        problems.append((f"{ns}:image", "expected an object {flake, attr, nixArgs}"))
        image = {}
    unknown = set(image) - {"flake", "attr", "nixArgs"}
    problems += [(f"{ns}:image.{k}", "unknown key") for k in sorted(unknown)]
    image_args = ImageArgs(
        flake=_typed(f"{ns}:image.flake", image.get("flake"), str, problems),
        attr=_typed(f"{ns}:image.attr", image.get("attr", "packages.x86_64-linux.image"), str, problems),
        nix_args=_typed(f"{ns}:image.nixArgs", image.get("nixArgs", []), list, problems) or [],
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
        kwargs = {
            attr: _typed(f"{where}.{key}", host[key], kind, problems)
            for key, (attr, kind) in _HOST_KEYS.items()
            if key in host
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
                    setattr(dl, k, _typed(f"{ns}:deadlines.{k}", deadlines[k], float, problems))
    port = 22 if ssh_port is None else _typed(f"{ns}:sshPort", ssh_port, int, problems)
    if problems:
        raise InvalidArgs(problems)
    return FleetArgs(hosts=host_args, image=image_args, deadlines=dl, ssh_port=port or 22)


def exports(fleet: Fleet) -> dict[str, Any]:
    """What the stack exports: the image and, per host, its addresses, known_hosts line and system."""
    hosts = {
        name: {"ipv4": host.ipv4, "ipv6": host.ipv6, "known_hosts": host.known_hosts, "system": host.system}
        for name, host in fleet.hosts.items()
    }
    return {"image": fleet.image.out_path, "hosts": hosts}


def declare(args: FleetArgs, name: str = "fleet") -> dict[str, Any]:
    """Declare the fleet, and on each host a command that runs once it converged; returns the exports."""
    fleet = Fleet(name, args)
    for host_name, host in fleet.hosts.items():
        # After convergence, further steps run over SSH with the pinned host key (checking stays on).
        command.remote.Command(
            f"{host_name}-uname",
            connection=host.connection_args(),
            create="uname -a",
            opts=pulumi.ResourceOptions(parent=host, depends_on=[fleet.first_boot]),
        )
    return exports(fleet)


def main() -> None:
    cfg = pulumi.Config("nix-dabei")
    args = fleet_args_from_config(
        cfg.require_object("image"),
        cfg.require_object("hosts"),
        cfg.get_object("deadlines"),
        cfg.get_int("sshPort"),
    )
    for key, value in declare(args).items():
        pulumi.export(key, value)
