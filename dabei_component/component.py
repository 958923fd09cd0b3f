"""The components: `nix-dabei:index:Fleet` (servers sharing one image) and `nix-dabei:index:Host` (one server).

Resource graph of a fleet:

    Fleet
    |- SshKeys            the deploy key (secret output)
    |- hcloud.SshKey      the deploy key, so rescue accepts it
    |- hcloud.SshKey      each pasted user key the project does not hold yet (one per key, shared by hosts)
    |- Image              nix build, compressed and hashed once
    |- Host (per server)
    |  |- HostKey         the host's generated SSH host key (secret output)
    |  `- hcloud.Server   placeholder OS; image, keys and user data ignored after creation
    |- Rescue             all hosts at once: rescue + reset, rescue host key pinned
    |- Install            all hosts at once: stream image, verify, write seed, boot from disk
    `- FirstBoot          all hosts at once: strict host key, boot id changed, converged

The three host steps take the whole fleet in one call each (see `steps/base.py` for why).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pulumi
import pulumi_command as command
import pulumi_hcloud as hcloud

from . import flakes, server_options, validation
from .hetzner import SYSTEMS
from .keys import PublicKey, known_hosts_line
from .recipients import recipients
from .rollout import HealthCheck, Rollout, check_health_check, check_rollout
from .steps.firstboot import FirstBoot
from .steps.image import Image
from .steps.install import Install
from .steps.keys import HostKey, SshKeys
from .steps.rescue import Rescue

DEFAULT_PLACEHOLDER_IMAGE = "debian-12"


@dataclass
class Deadlines:
    """Seconds each step may take for the whole fleet. Dynamic providers ignore CustomTimeouts."""

    rescue: float = 900
    install: float = 1800
    firstboot: float = 1800


@dataclass
class ImageArgs:
    """The disk image: a flake output that builds a raw NixOS-on-ZFS image (see nix/README.md).

    `attr` may hold `{system}` (`packages.{system}.image`): one image per Nix system the fleet's server
    types need, each built once; `attrs` names the output of a system explicitly (`{"aarch64-linux": ...}`).
    """

    flake: str
    attr: str = "packages.{system}.image"
    nix_args: list[str] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)

    def attr_for(self, system: str) -> str:
        return self.attrs.get(system) or self.attr.replace("{system}", system)


@dataclass(kw_only=True)
class HostArgs:
    """One host. `server_type` and `location` are required unless `existing_server` names the server.

    The fields from `networks` on are pulumi-hcloud's `ServerArgs`, passed to the `hcloud.Server` the
    component creates as given (see `server_options.py`); `image` to `datacenter` are the component's own
    and refused when set (they exist so that the refusal says why)."""

    name: str
    flake: str  # the host runs `nixos-rebuild switch --flake <flake>#<name>`
    server_type: str | None = None
    location: str | None = None
    # Pasted OpenSSH public keys, names of keys in the Hetzner project (free text) or their IDs.
    ssh_keys: list[str | int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    firewall_ids: list[int] = field(default_factory=list)
    disk: str = "/dev/sda"
    # A new ID wipes the disk and reinstalls the host from the current image; None: never reinstall. A new
    # image alone applies only to hosts installed from then on.
    reinstall: str | None = None
    # Checked after each switch and first boot, after the fleet's own `health_checks`.
    health_checks: list[HealthCheck] = field(default_factory=list)
    # A server made elsewhere (an `hcloud.Server` of this program, or a server ID) to install instead of
    # creating one; the component never deletes it. Its name must be the host's name.
    existing_server: hcloud.Server | pulumi.Input[int] | None = None
    # pulumi-hcloud `ServerArgs`, passed through.
    networks: pulumi.Input[list[pulumi.Input[hcloud.ServerNetworkArgs]]] | None = None
    placement_group_id: pulumi.Input[int] | None = None
    public_nets: pulumi.Input[list[pulumi.Input[hcloud.ServerPublicNetArgs]]] | None = None
    backups: pulumi.Input[bool] | None = None
    delete_protection: pulumi.Input[bool] | None = None
    rebuild_protection: pulumi.Input[bool] | None = None
    keep_disk: pulumi.Input[bool] | None = None
    shutdown_before_deletion: pulumi.Input[bool] | None = None
    ignore_remote_firewall_ids: pulumi.Input[bool] | None = None
    # Owned by the component: refused when set (server_options.OWNED says why).
    image: None = None
    user_data: None = None
    rescue: None = None
    iso: None = None
    allow_deprecated_images: None = None
    datacenter: None = None


@dataclass
class FleetArgs:
    hosts: list[HostArgs]
    image: ImageArgs
    deadlines: Deadlines = field(default_factory=Deadlines)
    placeholder_image: str = DEFAULT_PLACEHOLDER_IMAGE
    ssh_port: int = 22  # only for the local simulator; Hetzner's rescue listens on 22
    # Evaluate each host's system at preview (needs a deployer that evaluates NixOS; off: the preview
    # says the systems are not known and a host acts on any change of its flake's source).
    evaluate: bool = True
    # Which inputs of the host flakes the deployer sends to the hosts (flakes.SEND_INPUTS): "local", the
    # ones a host cannot fetch itself (local paths, git over SSH); "all", every one (private repositories).
    send_inputs: str = "local"
    # Where relative flake paths start; None: the Pulumi project's directory.
    base_dir: str | None = None
    # Checked on every host after each switch and first boot (see rollout.py).
    health_checks: list[HealthCheck] = field(default_factory=list)
    rollout: Rollout = field(default_factory=Rollout)


class InvalidArgs(ValueError):
    def __init__(self, problems: list[validation.Problem]) -> None:
        super().__init__("invalid nix-dabei arguments:\n" + "\n".join(f"  {p}: {r}" for p, r in problems))
        self.problems = problems


def validate(args: FleetArgs) -> list[validation.Problem]:
    problems: list[validation.Problem] = []
    if not isinstance(args.hosts, list) or not args.hosts:
        return [("hosts", "expected a non-empty list of hosts")]
    seen: set[str] = set()
    for i, host in enumerate(args.hosts):
        p = f"hosts[{i}]"
        problems += validation.hostname(f"{p}.name", host.name)
        if host.name in seen:
            problems.append((f"{p}.name", f"duplicate host name {host.name!r}: every host needs its own name"))
        seen.add(host.name)
        if host.existing_server is None:
            problems += validation.name(f"{p}.server_type", host.server_type, "server type")
            problems += validation.name(f"{p}.location", host.location, "location")
            problems += server_options.validate(p, host)
        else:
            problems += _existing_server_problems(p, host)
        problems += validation.flake_ref(f"{p}.flake", host.flake)
        problems += validation.ssh_keys(f"{p}.ssh_keys", host.ssh_keys)
        problems += validation.labels(f"{p}.labels", host.labels)
        problems += validation.firewall_ids(f"{p}.firewall_ids", host.firewall_ids)
        problems += validation.disk(f"{p}.disk", host.disk)
        problems += validation.reinstall(f"{p}.reinstall", host.reinstall)
        problems += _health_checks(f"{p}.health_checks", host.health_checks)
    problems += validation.flake_ref("image.flake", args.image.flake)
    for step in ("rescue", "install", "firstboot"):
        problems += validation.positive_seconds(f"deadlines.{step}", getattr(args.deadlines, step))
    problems += _health_checks("health_checks", args.health_checks)
    if not isinstance(args.rollout, Rollout):
        problems.append(("rollout", f"expected a Rollout, got {type(args.rollout).__name__}"))
    else:
        problems += check_rollout("rollout", {**args.rollout.wire(), "max_unavailable": args.rollout.max_unavailable})
    if args.send_inputs not in flakes.SEND_INPUTS:
        problems.append(("send_inputs", f"expected one of {', '.join(flakes.SEND_INPUTS)}, got {args.send_inputs!r}"))
    return problems


def _health_checks(prop: str, checks: Any) -> list[validation.Problem]:
    if not isinstance(checks, list):
        return [(prop, f"expected a list of health checks, got {type(checks).__name__}")]
    problems: list[validation.Problem] = []
    for i, check in enumerate(checks):
        if not isinstance(check, HealthCheck):
            problems.append((f"{prop}[{i}]", f"expected a HealthCheck, got {type(check).__name__}"))
            continue
        problems += check_health_check(f"{prop}[{i}]", {k: v for k, v in vars(check).items() if k != "name"})
        if check.name is not None and (not isinstance(check.name, str) or not check.name.strip()):
            problems.append((f"{prop}[{i}].name", f"expected a non-empty name, got {check.name!r}"))
    return problems


def _existing_server_problems(prop: str, host: HostArgs) -> list[validation.Problem]:
    server = host.existing_server
    problems: list[validation.Problem] = []
    if not isinstance(server, hcloud.Server | pulumi.Output):
        problems += validation.hetzner_id(f"{prop}.existing_server", server)
    problems += [
        (f"{prop}.{n}", "set on the existing server itself: the component does not create it")
        for n in server_options.set_on(host)
    ]
    problems += [(p, r) for p, r in server_options.validate(prop, host) if p.split(".")[-1] in server_options.OWNED]
    return problems


def _get(mapping: Mapping[str, Any] | None, key: str) -> Any:
    return (mapping or {}).get(key)


def _step_results(step_hosts: pulumi.Output[dict[str, Any]], fields: tuple[str, ...]) -> pulumi.Output[Any]:
    """The named results of a step for each host, `{name: {field: value}}`, for the step after it.

    They travel as one input of their own, beside `hosts`, so that a preview shows them as one value
    (`rescued`, `installed`) instead of a change under every host: a preview of a step being updated hands
    back its inputs as its outputs (the engine's rule for providers that do not preview), so its results
    are not known yet, and they are marked so."""

    def pick(hosts: Mapping[str, Any]) -> Any:
        if pulumi.runtime.is_dry_run() and any(f not in h for h in hosts.values() for f in fields):
            return pulumi.output.UNKNOWN
        return {n: {f: h.get(f) for f in fields} for n, h in hosts.items()}

    return step_hosts.apply(pick)


# Marks the SSH keys a fleet uploads itself (pasted public keys the project did not hold): those stay the
# fleet's resources on later runs, while a key the project already holds under any name is only used.
OWNER_LABEL = "nix-dabei/fleet"


def _owner(fleet: str) -> str:
    """The `OWNER_LABEL` value of one fleet of one stack (a label value holds at most 63 characters)."""
    ident = f"{pulumi.get_project()}/{pulumi.get_stack()}/{fleet}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ProjectKey:
    """An SSH key of the Hetzner project, as pulumi-hcloud's `getSshKeys` returns it (`md5` is the
    `fingerprint` field)."""

    id: int
    name: str
    public_key: str
    md5: str
    labels: dict[str, str]


def project_ssh_keys() -> list[ProjectKey]:
    """Every SSH key of the project, through pulumi-hcloud's `getSshKeys` invoke (it runs at preview too)."""
    found = hcloud.get_ssh_keys().ssh_keys
    return [ProjectKey(int(k.id), k.name, k.public_key, k.fingerprint, dict(k.labels or {})) for k in found]


@dataclass
class KeyPlan:
    """Per host: the Hetzner keys for the server (IDs of keys the project holds, or the MD5 fingerprint of a
    pasted key the fleet uploads: `upload[md5]`) and root's authorized key lines for the installed host."""

    server_keys: dict[str, list[int | str]]
    authorized: dict[str, list[str]]
    upload: dict[str, str]  # md5 fingerprint -> `type base64` of each key the fleet uploads
    problems: list[validation.Problem]


def plan_user_keys(hosts: list[HostArgs], project: list[ProjectKey], owner: str) -> KeyPlan:
    """Resolve each host's `ssh_keys`: names and IDs to keys of the project, pasted keys to the project's key
    with the same fingerprint (whatever its name or comment) or else to an upload shared by all hosts."""
    by_id = {k.id: k for k in project}
    by_name = {k.name: k for k in project}
    by_md5 = {k.md5: k for k in project}
    plan = KeyPlan({}, {}, {}, [])
    for i, host in enumerate(hosts):
        server_keys: list[int | str] = []
        authorized: list[str] = []
        for j, entry in enumerate(host.ssh_keys):
            key = validation.ssh_key_entry(entry)  # validate() has vouched for every entry
            if isinstance(key, PublicKey):
                held = by_md5.get(key.md5)
                use: int | str = key.md5
                if held is not None and held.labels.get(OWNER_LABEL) != owner:
                    use = held.id
                else:
                    plan.upload.setdefault(key.md5, key.blob)
                line = key.line
            else:
                # Like pulumi-hcloud (hcloud-go's Get): a number is tried as an ID first, then as a name.
                held = by_id.get(int(key)) if isinstance(key, int) or key.isdigit() else None
                if held is None and isinstance(key, str):
                    held = by_name.get(key)
                if held is None:
                    plan.problems.append((f"hosts[{i}].ssh_keys[{j}]", _missing_key(key, project)))
                    continue
                use, line = held.id, held.public_key
            if use not in server_keys:
                server_keys.append(use)
                authorized.append(line)
        plan.server_keys[host.name] = server_keys
        plan.authorized[host.name] = authorized
    return plan


def _missing_key(key: int | str, project: list[ProjectKey]) -> str:
    names = sorted(repr(k.name) for k in project)
    held = f"it has {', '.join(names[:10])}{' and more' if len(names) > 10 else ''}" if names else "it has none"
    if isinstance(key, int):
        return f"no SSH key with ID {key} in this Hetzner project ({held})"
    return (
        f"no SSH key named {key!r} in this Hetzner project ({held}); names match exactly, or paste the "
        f"public key itself{validation.not_a_key_hint(key)}"
    )


def _server_type(host: HostArgs) -> str | None:
    """The host's server type: given, or that of the existing server given by ID (pulumi-hcloud's
    `getServer` invoke, which answers at preview too); None when only an output names the server."""
    if host.server_type is not None or host.existing_server is None:
        return host.server_type
    if isinstance(host.existing_server, int):
        found = hcloud.get_server(id=host.existing_server)
        _same_name(host.name, [host.existing_server, found.name])  # named at preview, by its config key
        return str(found.server_type)
    return None


def _given_as_resource(host: HostArgs) -> bool:
    """An existing server given as a resource or output: its type is not known while the program runs."""
    return host.existing_server is not None and not isinstance(host.existing_server, int)


def host_systems(hosts: list[HostArgs]) -> tuple[dict[str, str], list[validation.Problem]]:
    """Each host's Nix system, from its server type's `architecture` in the Hetzner catalog (pulumi-hcloud's
    `getServerType` invoke, which answers at preview too)."""
    by_type: dict[str, str | None] = {}
    problems: list[validation.Problem] = []
    systems: dict[str, str] = {}
    for i, host in enumerate(hosts):
        try:
            server_type = _server_type(host)
        except InvalidArgs as exc:
            problems += [(f"hosts[{i}].{prop}", reason) for prop, reason in exc.problems]
            continue
        except Exception as exc:  # the invoke's error names the server
            problems.append((f"hosts[{i}].existing_server", f"cannot read the server: {exc}"))
            continue
        if server_type is None:
            # An existing server given as a resource or an output: its type is not known while the program
            # runs; it gets the x86_64 image (an arm server boots only when given by its ID).
            systems[host.name] = "x86_64-linux"
            continue
        if server_type not in by_type:
            try:
                arch = hcloud.get_server_type(name=server_type).architecture
            except Exception as exc:  # the invoke's error names the type; say which config key holds it
                problems.append((f"hosts[{i}].server_type", f"cannot read server type {server_type!r}: {exc}"))
                by_type[server_type] = None
                continue
            by_type[server_type] = SYSTEMS.get(str(arch))
            if by_type[server_type] is None:
                problems.append(
                    (f"hosts[{i}].server_type", f"server type {server_type!r}: unknown architecture {arch!r}")
                )
        system = by_type[server_type]
        if system is not None:
            systems[host.name] = system
    return systems, problems


def resolve_flakes(
    args: FleetArgs, platforms: Mapping[str, str] | None = None
) -> tuple[dict[str, flakes.LockedFlake], dict[str, str | None], list[validation.Problem]]:
    """Lock every host flake on the deployer and, with `evaluate`, evaluate each host's system (one `nix
    eval` for the fleet). A system built for another Nix system than the host's server runs (`platforms`,
    from its server type) is a problem. Returns (locked by flake text, system by host name, problems)."""
    base = args.base_dir or flakes.project_dir()
    nix_args = list(args.image.nix_args)
    locked: dict[str, flakes.LockedFlake] = {}
    problems: list[validation.Problem] = []
    for i, host in enumerate(args.hosts):
        if host.flake in locked:
            continue
        try:
            locked[host.flake] = flakes.lock(host.flake, base, nix_args, args.send_inputs)
        except flakes.FlakeError as exc:
            problems.append((f"hosts[{i}].flake", str(exc)))
    systems: dict[str, str | None] = {h.name: None for h in args.hosts}
    # Every host whose flake locked is evaluated, so one run names every problem.
    evaluable = [(i, h) for i, h in enumerate(args.hosts) if h.flake in locked]
    if args.evaluate and evaluable:
        try:
            evaluated = flakes.evaluate_systems({h.name: locked[h.flake] for _, h in evaluable}, base, nix_args)
            systems.update({name: e.path for name, e in evaluated.items()})
            for i, host in evaluable:
                runs = (platforms or {}).get(host.name)
                built = evaluated[host.name].system
                if runs and built and built != runs and not _given_as_resource(host):
                    problems.append(
                        (
                            f"hosts[{i}].flake",
                            f"nixosConfigurations.{host.name} is built for {built}, but its server "
                            f"({host.server_type or host.existing_server}) runs {runs}",
                        )
                    )
        except flakes.FlakeError as exc:
            # Only when the fleet's evaluation failed: each host alone, to name the ones that fail.
            failed = len(problems)
            for i, host in evaluable:
                try:
                    flakes.evaluate_systems({host.name: locked[host.flake]}, base, nix_args)
                except flakes.FlakeError as alone:
                    directory = locked[host.flake].directory
                    hint = flakes.untracked_hint(Path(directory)) if directory else ""
                    problems.append((f"hosts[{i}].flake", f"{alone}{hint}"))
            if len(problems) == failed:
                problems.append(("hosts", str(exc)))
    elif not args.evaluate:
        names = ", ".join(h.name for h in args.hosts)
        pulumi.log.warn(f"systems not known (evaluation is off): {names} act on any change of their flake's source")
    return locked, systems, problems


def _same_name(host: str, found: list[Any]) -> int:
    server_id, server_name = found
    if server_name is not None and not isinstance(server_name, pulumi.output.Unknown) and server_name != host:
        raise InvalidArgs(
            [
                (
                    "existing_server",
                    f"server {server_id} is named {server_name!r}, not {host!r}: the installed system builds "
                    f"<flake>#<the server's name>, so name the host {server_name!r} or rename the server",
                )
            ]
        )
    return int(server_id)


class Host(pulumi.ComponentResource):
    """One server of a fleet: the hcloud server and what the component proved about it."""

    ipv4: pulumi.Output[str | None]
    ipv6: pulumi.Output[str | None]
    address: pulumi.Output[str]
    recipients: pulumi.Output[dict[str, str]]
    known_hosts: pulumi.Output[str]
    system: pulumi.Output[str]
    connection: pulumi.Output[Any]

    def __init__(
        self,
        name: str,
        args: HostArgs,
        *,
        placeholder_image: str,
        authorized_key_names: list[pulumi.Input[str]],
        adopt_host_key: pulumi.Input[str | None] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("nix-dabei:index:Host", name, None, opts)
        self.args = args
        child = pulumi.ResourceOptions(parent=self)
        self.host_key = HostKey(f"{name}-hostkey", host=args.name, adopt_private_key=adopt_host_key, opts=child)
        self.server: hcloud.Server | None = None  # only a server the component created
        existing = args.existing_server
        if existing is None:
            self.server = hcloud.Server(
                f"{name}-server",
                name=args.name,
                server_type=args.server_type,
                location=args.location,
                image=placeholder_image,
                labels=args.labels,
                firewall_ids=[int(f) for f in args.firewall_ids],
                ssh_keys=authorized_key_names,
                **server_options.server_kwargs(args),
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # The OS on the disk is ours after installation: changing the placeholder image or the
                    # keys (which pulumi-hcloud would do by replacing the server) must never replace it.
                    ignore_changes=["image", "sshKeys", "userData"],
                    # Server names are unique in a Hetzner project: a replacement (a new `location`) can only
                    # be created once the old server is gone.
                    delete_before_replace=True,
                ),
            )
        # The server resource, or what pulumi-hcloud's `getServer` reads of a server given by ID: the same
        # output names either way.
        server: Any = self.server or (
            existing if isinstance(existing, hcloud.Server) else hcloud.get_server_output(id=existing)
        )
        self.server_type, self.location = server.server_type, server.location
        # The installed system builds `<flake>#<server name from the metadata>`: it must be the host's name.
        self.server_id = pulumi.Output.all(server.id, server.name).apply(partial(_same_name, args.name))
        # pulumi-hcloud reports an address that is off as "": the outputs say None.
        self.ipv4 = server.ipv4_address.apply(lambda a: a or None)
        self.ipv6 = server.ipv6_address.apply(lambda a: a or None)
        # Where the component and `connection_args()` reach the host: IPv4, else (IPv6-only) IPv6.
        self.address = pulumi.Output.all(self.ipv4, self.ipv6).apply(lambda a: a[0] or a[1])
        self.recipients = self.host_key.public_key.apply(recipients)

    def finish(self, first_boot: FirstBoot, deploy_key: pulumi.Output[str], ssh_port: int) -> None:
        name = self.args.name
        self.system = first_boot.hosts.apply(lambda hosts: hosts[name].get("system"))
        host_public_key = self.host_key.public_key
        self.known_hosts = pulumi.Output.all(self.address, host_public_key).apply(
            lambda a: known_hosts_line(a[0], a[1], port=ssh_port)
        )
        # Chain `command.remote.Command` steps on this (with `depends_on` the fleet's first boot): host-key
        # checking stays on. Only what identifies the host goes in, so a preview that updates a step does
        # not show every command's connection as changing.
        self.connection = pulumi.Output.secret(
            pulumi.Output.all(self.address, host_public_key, deploy_key).apply(
                lambda a: {"host": a[0], "port": ssh_port, "user": "root", "host_key": a[1], "private_key": a[2]}
            )
        )
        self.register_outputs(
            {
                "ipv4": self.ipv4,
                "ipv6": self.ipv6,
                "known_hosts": self.known_hosts,
                "system": self.system,
                "recipients": self.recipients,
            }
        )

    def connection_args(self) -> command.remote.ConnectionArgs:
        return command.remote.ConnectionArgs(
            host=self.connection.apply(lambda c: c["host"]),
            port=self.connection.apply(lambda c: c["port"]),
            user="root",
            host_key=self.connection.apply(lambda c: c["host_key"]),
            private_key=self.connection.apply(lambda c: c["private_key"]),
        )


class Fleet(pulumi.ComponentResource):
    """Servers that share one image: built once, written to every host, each converged on its flake."""

    hosts: dict[str, Host]

    def __init__(self, name: str, args: FleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        problems = validate(args)
        if problems:
            raise InvalidArgs(problems)
        owner = _owner(name)
        project = project_ssh_keys() if any(h.ssh_keys for h in args.hosts) else []
        keys = plan_user_keys(args.hosts, project, owner)
        if keys.problems:
            raise InvalidArgs(keys.problems)
        platforms, problems = host_systems(args.hosts)
        locked, systems, flake_problems = resolve_flakes(args, platforms)
        if problems or flake_problems:
            raise InvalidArgs(problems + flake_problems)
        super().__init__("nix-dabei:index:Fleet", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        self.keys = SshKeys(f"{name}-keys", opts=child)
        self.deploy_key = hcloud.SshKey(f"{name}-deploy", public_key=self.keys.deploy_public_key, opts=child)
        # One image per Nix system in use, each built once; the x86_64 one keeps the name a fleet had
        # before images were per system.
        self.images: dict[str, Image] = {}
        for system in sorted(set(platforms.values())):
            users = [f"{h.name} ({h.server_type})" for h in args.hosts if platforms[h.name] == system]
            self.images[system] = Image(
                f"{name}-image" if system == "x86_64-linux" else f"{name}-image-{system}",
                flake=args.image.flake,
                attr=args.image.attr_for(system),
                nix_args=args.image.nix_args,
                system=system,
                for_hosts=users,
                opts=child,
            )
        # The fleet's `image` output as before images were per system: the x86_64 one when there is one.
        self.image = self.images.get("x86_64-linux") or next(iter(self.images.values()))

        uploaded = {}
        for md5, blob in keys.upload.items():
            key_name = f"{name}-key-{md5.replace(':', '')[:12]}"  # named by the key: stable as hosts change
            uploaded[md5] = hcloud.SshKey(
                key_name, name=key_name, public_key=blob, labels={OWNER_LABEL: owner}, opts=child
            )
        self.hosts = {}
        for host in args.hosts:
            # The deploy key too: a server created without keys gets a root password by e-mail.
            key_names: list[pulumi.Input[str]] = [self.deploy_key.name]
            for use in keys.server_keys[host.name]:
                key_names.append(str(use) if isinstance(use, int) else uploaded[use].id)
            self.hosts[host.name] = Host(
                f"{name}-{host.name}",
                host,
                placeholder_image=args.placeholder_image,
                authorized_key_names=key_names,
                adopt_host_key=self.keys.host_private_keys.apply(partial(_get, key=host.name)),
                opts=child,
            )
        host_private_keys = {n: h.host_key.private_key for n, h in self.hosts.items()}

        authorized = {
            h.name: pulumi.Output.all(self.keys.deploy_public_key, *keys.authorized[h.name]).apply(list)
            for h in args.hosts
        }
        # What the program says about each host. Every step gets these directly (not through the step
        # before it), so a step that has nothing to do never hands stale inputs downstream.
        # A plain map of outputs, not one output: each value is sent on its own, so a preview that adds a
        # host has only that host's values not known yet (`hosts.<new>`), not the whole map.
        host_inputs: dict[str, dict[str, pulumi.Input[Any]]] = {
            h.name: {
                "server_id": self.hosts[h.name].server_id,
                "ipv4": self.hosts[h.name].ipv4,
                "ipv6": self.hosts[h.name].ipv6,
                "image": self.images[platforms[h.name]].out_path,
                "platform": platforms[h.name],
                "reinstall": h.reinstall,
                "disk": h.disk,
                "flake": h.flake,
                "hostname": h.name,
                "server_type": self.hosts[h.name].server_type,
                "location": self.hosts[h.name].location,
                "host_public_key": self.hosts[h.name].host_key.public_key,
                "authorized_keys": authorized[h.name],
                # The store path the host must run (None: evaluation off, then the source decides).
                "system": systems[h.name],
                **({} if args.evaluate else {"source": locked[h.flake].nar_hash}),
            }
            for h in args.hosts
        }
        # The locked source of each host flake (by its text in the config): sent to the hosts that act.
        sources = {flake: lock.to_json() for flake, lock in locked.items()}
        rescue_keys = [self.deploy_key.id.apply(int)]
        self.rescue = Rescue(
            f"{name}-rescue",
            hosts=host_inputs,
            rescue_ssh_key_ids=rescue_keys,
            deploy_private_key=self.keys.deploy_private_key,
            deadline_seconds=args.deadlines.rescue,
            opts=child,
        )
        image_outputs = {
            system: pulumi.Output.all(
                flake=image.flake,
                attr=image.attr,
                nix_args=image.nix_args,
                cache_dir=image.cache_dir,
                out_path=image.out_path,
                seed_size=image.seed_size,
            )
            for system, image in self.images.items()
        }
        rescue_results = ("rescue_host_key", "rescue_boot_id", "rescue_action_id")
        self.install = Install(
            f"{name}-install",
            hosts=host_inputs,
            rescued=_step_results(self.rescue.hosts, rescue_results),
            images=image_outputs,
            sources=sources,
            rescue_ssh_key_ids=rescue_keys,
            deploy_private_key=self.keys.deploy_private_key,
            host_private_keys=host_private_keys,
            deadline_seconds=args.deadlines.install,
            opts=child,
        )
        self.first_boot = FirstBoot(
            f"{name}-firstboot",
            hosts=host_inputs,
            installed=_step_results(self.install.hosts, ("installed_image", "rescue_boot_id")),
            sources=sources,
            deploy_private_key=self.keys.deploy_private_key,
            deadline_seconds=args.deadlines.firstboot,
            rollout=args.rollout.wire(),
            # Only hosts with checks: adding a host without any shows nothing here in a preview.
            health_checks={
                h.name: [c.wire() for c in [*args.health_checks, *h.health_checks]]
                for h in args.hosts
                if args.health_checks or h.health_checks
            },
            opts=child,
        )
        for h in args.hosts:
            self.hosts[h.name].finish(self.first_boot, self.keys.deploy_private_key, args.ssh_port)
        self.register_outputs(
            {
                "images": {system: image.out_path for system, image in self.images.items()},
                "hosts": {n: {"ipv4": h.ipv4, "system": h.system} for n, h in self.hosts.items()},
            }
        )
