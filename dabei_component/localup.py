"""`pulumi preview`, `up`, `refresh` and `destroy` without the Pulumi CLI: a small engine for the demo and tests.

The Pulumi program (the real components) runs under Pulumi's mock monitor. Each resource registration is
carried out the way the engine carries it out:

- dynamic resources go to the real provider server over gRPC: Check (olds are the recorded inputs), then
  Create, or Diff (olds are the recorded outputs) and Update; values not known yet travel as the engine
  sends them (`rpc.UNKNOWN`, deserialized by the provider server as `pulumi.output.Unknown`);
- pulumi-hcloud and pulumi-command resources have small stand-ins: hcloud servers and SSH keys through the
  official `hcloud` library, remote commands over asyncssh with the given host key pinned.

The modes follow the engine (`pkg/resource/deploy`, `sdk/go/common/resource/plugin/provider_plugin.go`):

- preview: the program runs with `preview=True`; nothing is created. A resource created or updated in a
  preview hands back its checked inputs as its outputs (dynamic providers do not preview), so an output
  that is not an input is not known: that is what the program and every resource after it see.
- up: previews first (unless `skip_preview`), then registers for real; resources of the old state that
  the program no longer declares are deleted at the end, dependents first.
- refresh: Read of every resource with its recorded outputs and inputs, then Diff of what was read
  against the recorded inputs: what differs is shown, and recorded for the next preview.
- destroy: Delete of every resource, dependents first.

Every mode returns a `Plan`, printed the way a reviewer reads `pulumi preview --diff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from hcloud import APIException, Client
from hcloud.images import Image as HImage
from hcloud.locations import Location
from hcloud.networks import Network
from hcloud.placement_groups import PlacementGroup
from hcloud.primary_ips import PrimaryIP
from hcloud.server_types import ServerType
from hcloud.servers import ServerCreatePublicNetwork
from hcloud.ssh_keys import SSHKey
from pulumi.output import Unknown
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc

from .provider_server import PROVIDER_KEY, ProviderServer

DYNAMIC = "pulumi-python:dynamic:Resource"
HCLOUD_SERVER = "hcloud:index/server:Server"
HCLOUD_SSH_KEY = "hcloud:index/sshKey:SshKey"
HCLOUD_GET_SSH_KEY = "hcloud:index/getSshKey:getSshKey"
COMMAND = "command:remote:Command"

# Server inputs whose change makes pulumi-hcloud replace the server (ForceNew in terraform-provider-hcloud's
# `hcloud_server`); the other inputs it changes in place (`server_type` by a resize).
SERVER_REPLACE_ON = ("location",)
# Inputs pulumi-hcloud changes on an existing server that this stand-in only sets at creation: a change is
# refused rather than silently not applied.
SERVER_CREATE_ONLY = ("networks", "placementGroupId", "publicNets")
HCLOUD_GET_SERVER = "hcloud:index/getServer:getServer"
# Outputs of an hcloud server that only the API knows (not known in a preview of its creation).
SERVER_COMPUTED = ("ipv4Address", "ipv6Address", "ipv6Network", "status")

HCLOUD_GET_SSH_KEYS = "hcloud:index/getSshKeys:getSshKeys"
HCLOUD_GET_SERVER_TYPE = "hcloud:index/getServerType:getServerType"

SYMBOLS = {"create": "+", "update": "~", "replace": "+-", "delete": "-", "same": " "}


class UpFailed(RuntimeError):
    pass


def _unwrap_secrets(value: Any) -> Any:
    value = rpc.unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {k: _unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap_secrets(v) for v in value]
    return value


def _holds_secret(value: Any) -> bool:
    if rpc.is_rpc_secret(value):
        return True
    if isinstance(value, dict):
        return any(_holds_secret(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_secret(v) for v in value)
    return False


def _known(value: Any) -> bool:
    return not rpc.contains_unknowns(value)


def diff_paths(old: Any, new: Any, prefix: str = "", values: dict[str, tuple[Any, Any]] | None = None) -> list[str]:
    """Property paths at which `new` differs from `old`, as `pulumi preview --diff` names them
    (`hosts.web-1.flake`, `sshKeys[0]`); a value not known yet differs. `values` collects (old, new) at
    each path."""
    values = {} if values is None else values
    if isinstance(new, Unknown):
        values[prefix or "(all)"] = (old, new)
        return [prefix or "(all)"]
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        paths: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            if key == PROVIDER_KEY and not prefix:
                continue
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                paths.append(sub)
                values[sub] = (old.get(key), new.get(key))
            else:
                paths += diff_paths(old[key], new[key], sub, values)
        return paths
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [p for i, (o, n) in pairs for p in diff_paths(o, n, f"{prefix}[{i}]", values)]
    if old != new:
        values[prefix or "(all)"] = (old, new)
        return [prefix or "(all)"]
    return []


def _drift_paths(value: Any, prefix: str = "") -> list[str]:
    """Where a provider recorded drift (a truthy `drift`): what makes a diff with unchanged inputs act."""
    if isinstance(value, Mapping):
        found = [f"{prefix}.drift".lstrip(".")] if value.get("drift") else []
        for key, sub in value.items():
            if key != "drift":
                found += _drift_paths(sub, f"{prefix}.{key}" if prefix else str(key))
        return found
    return []


@dataclass
class Recorded:
    """One resource of the state: what the engine records after each operation."""

    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    type: str = ""
    name: str = ""
    parent: str | None = None  # key of the parent resource
    dependencies: list[str] = field(default_factory=list)  # keys of the resources it depends on
    custom: bool = True
    # Outputs the engine stores encrypted: `additional_secret_outputs`, outputs named like a secret input
    # (the engine keeps the secret bit for providers that do not accept secrets), and `__provider`.
    secret_outputs: list[str] = field(default_factory=list)
    # Paths of the inputs that were secret in the program (the engine keeps them encrypted, also when a
    # provider's Check hands them back without the secret bit: `annotateSecrets`, provider_plugin.go).
    secret_inputs: list[list[str | int]] = field(default_factory=list)

    def plain_outputs(self) -> dict[str, Any]:
        """The outputs as the state stores them in plain text."""
        return {k: v for k, v in self.outputs.items() if k not in self.secret_outputs and k != PROVIDER_KEY}

    def plain_inputs(self) -> dict[str, Any]:
        """The inputs as the state stores them in plain text: all but the values that were secret, at any
        depth (the engine encrypts those)."""
        plain = _unwrap_secrets(self.inputs)  # a copy
        for path in [*self.secret_inputs, *_secret_paths(self.inputs)]:
            _mask(plain, path)
        return plain


def _secret_paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[list[str | int]]:
    """The paths of the secret values in `value` (RPC secret wrappers), outermost first."""
    if rpc.is_rpc_secret(value):
        return [list(prefix)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _secret_paths(v, (*prefix, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _secret_paths(v, (*prefix, i))]
    return []


def _mask(value: Any, path: list[str | int]) -> None:
    """Replace the value at `path` (when it is there) with the secret placeholder."""
    *parents, last = path
    for part in parents:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return
    in_dict = isinstance(value, dict) and last in value
    if in_dict or (isinstance(value, list) and isinstance(last, int) and last < len(value)):
        value[last] = SECRET_SHOWN


@dataclass
class Change:
    """One line of a plan: the operation on a resource and the property paths that made it."""

    op: str  # create, update, replace, delete, same
    key: str
    paths: tuple[str, ...] = ()
    # (old, new) at each path, for `diff()`.
    values: dict[str, tuple[Any, Any]] = field(default_factory=dict, compare=False, repr=False)
    # The checked inputs the step goes ahead with (what `pulumi preview --diff` prints the changed values of).
    inputs: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def diff(self) -> list[str]:
        """`pulumi preview --diff` lines of an update: `hosts.web-1.system: /nix/store/a… => /nix/store/b…`."""
        return [
            f"{p}: {_shown(self.values[p][0])} => {_shown(self.values[p][1])}" for p in self.paths if p in self.values
        ]

    @property
    def type(self) -> str:
        return self.key.split("::", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split("::", 1)[1]

    def __str__(self) -> str:
        text = f"{SYMBOLS[self.op]} {self.type} {self.name}"
        return text + (f"  [{', '.join(self.paths)}]" if self.paths else "")


SECRET_SHOWN = "[secret]"


UNKNOWN_SHOWN = "output<string>"


def _shown(value: Any) -> str:
    """A value as `pulumi preview --diff` prints it: one not known yet as `output<string>`, at any depth."""

    def known(v: Any) -> Any:
        if isinstance(v, Unknown):
            return UNKNOWN_SHOWN
        if isinstance(v, dict):
            return {k: known(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [known(x) for x in v]
        return v

    return "(none)" if value is None else str(known(value))


class Plan(list[Change]):
    """The steps of one run, in the order the resources were registered."""

    def changes(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Every resource that is not unchanged: `{name: (op, paths)}` (names are unique in a stack)."""
        return {c.name: (c.op, c.paths) for c in self if c.op != "same"}

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self:
            counts[c.op] = counts.get(c.op, 0) + 1
        return counts

    def render(self) -> str:
        """The plan as `pulumi preview --diff` prints it: one line per resource, then its changed values."""
        lines = [line for c in self if c.op != "same" for line in (str(c), *(f"    {d}" for d in c.diff()))]
        counts = self.summary()
        words = {"create": "to create", "update": "to update", "replace": "to replace", "delete": "to delete"}
        parts = [f"{counts[op]} {word}" for op, word in words.items() if counts.get(op)]
        parts.append(f"{counts.get('same', 0)} unchanged")
        return "\n".join([*lines, "Resources: " + ", ".join(parts)])


def _key_of_urn(urn: str) -> str:
    """`urn:pulumi:stack::project::parent$type::name` -> `type::name`."""
    *_, qualified_type, name = urn.split("::")
    return f"{qualified_type.split('$')[-1]}::{name}"


class _Monitor(pulumi_mocks.MockMonitor):
    """The mock monitor, also telling the engine what `MockResourceArgs` leaves out: parent, dependencies
    and `ignore_changes` of each registration."""

    def __init__(self, engine: LocalEngine, run: int) -> None:
        super().__init__(engine)
        self._engine = engine
        self._run = run

    def RegisterResource(self, request: Any) -> Any:
        top_level = not request.parent or "pulumi:pulumi:Stack" in request.parent
        self._engine._options.value = {
            "parent": None if top_level else _key_of_urn(request.parent),
            "dependencies": sorted({_key_of_urn(u) for u in request.dependencies}),
            "ignore_changes": list(request.ignoreChanges),
            "secret_outputs": list(request.additionalSecretOutputs),
            "delete_before_replace": bool(request.deleteBeforeReplace),
            "run": self._run,
        }
        return super().RegisterResource(request)


@dataclass
class LocalEngine(pulumi_mocks.Mocks):
    server: ProviderServer
    hcloud: Client
    state: dict[str, Recorded] = field(default_factory=dict)
    # What happened to each resource in the last run: created, updated, replaced, deleted, same.
    operations: dict[str, str] = field(default_factory=dict)
    # Called with (key, record, operation) after each resource is created or updated, before anything
    # that depends on it runs: tests inject faults at exact points of the flow through these.
    listeners: list[Callable[[str, Recorded, str], None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Resource operations at once, like `pulumi up --parallel` (whose default is unbounded).
    parallel: int = 256
    project: str = "nix-dabei"
    stack: str = "local"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0  # registrations being carried out
        self._run_id = 0
        self._options = threading.local()
        self._preview = False
        self._plan = Plan()
        self._registered: set[str] = set()
        self._working: dict[str, Recorded] = {}
        self.last_preview = Plan()  # the preview `up` ran first
        self.last_plan = Plan()  # what the last `up` did

    # -- state on disk -----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({k: asdict(r) for k, r in self.state.items()}, indent=1, sort_keys=True))

    @staticmethod
    def load_state(path: Path) -> dict[str, Recorded]:
        """A state written by `save`, or by an earlier release (`{key: {id, inputs, outputs}}`)."""
        raw = json.loads(path.read_text())
        state = {}
        for key, rec in raw.items():
            typ, name = key.split("::", 1)
            rec.setdefault("type", typ)
            rec.setdefault("name", name)
            rec.setdefault("custom", typ in (DYNAMIC, HCLOUD_SERVER, HCLOUD_SSH_KEY, COMMAND))
            state[key] = Recorded(**rec)
        return state

    # -- Mocks protocol ----------------------------------------------------------------------------

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        key = f"{args.typ}::{args.name}"
        options = getattr(self._options, "value", None) or {}
        with self._lock:
            if options.get("run") != self._run_id:
                # A registration of an earlier program that failed while it was still running.
                raise UpFailed(f"{args.name}: registration of an earlier run, not carried out")
            self._registered.add(key)
            self._inflight += 1
        try:
            return self._register(key, args, options)
        finally:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()

    def _register(
        self, key: str, args: pulumi_mocks.MockResourceArgs, options: Mapping[str, Any]
    ) -> tuple[str | None, dict[str, Any]]:
        old = self._working.get(key)
        inputs = dict(args.inputs)
        if old is not None:
            # The engine applies `ignore_changes` before Check: ignored paths keep their recorded value.
            for prop in options.get("ignore_changes", []):
                if prop in old.inputs:
                    inputs[prop] = old.inputs[prop]
                else:
                    inputs.pop(prop, None)
        secret = {*options.get("secret_outputs", []), *(k for k, v in inputs.items() if rpc.is_rpc_secret(v))}
        rec = Recorded("", inputs, {}, args.typ, args.name, options.get("parent"), options.get("dependencies", []))
        rec.secret_outputs = sorted(secret)
        rec.secret_inputs = _secret_paths(inputs)
        try:
            if args.typ == DYNAMIC:
                op, rec = self._dynamic(key, rec, old)
            elif args.typ == HCLOUD_SERVER:
                op, rec = self._server(key, rec, old, options)
            elif args.typ == HCLOUD_SSH_KEY:
                op, rec = self._ssh_key(key, rec, old)
            elif args.typ == COMMAND:
                op, rec = self._command(key, rec, old)
            else:  # a component: the engine only records it
                rec.custom = False
                rec.id = old.id if old else f"{args.name}-id"
                op, paths = ("same" if old else "create"), ()
                self._step(key, rec, op, paths)
                return rec.id, {}
        except Exception as exc:
            self.errors.append(f"{args.name}: {exc}")
            raise
        # As the engine does: outputs it stores encrypted come back to the program as secrets, so the
        # inputs made of them are secrets too.
        return rec.id or None, {
            k: rpc.wrap_rpc_secret(v) if k in rec.secret_outputs else v for k, v in rec.outputs.items()
        }

    def call(self, args: pulumi_mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        """The invokes of pulumi-hcloud the component makes, answered as pulumi-hcloud answers them."""
        if args.token == HCLOUD_GET_SSH_KEYS:
            keys = self.hcloud.ssh_keys.get_all(label_selector=args.args.get("withSelector") or None)
            found = [self._ssh_key_outputs(k) for k in sorted(keys, key=lambda k: k.id or 0)]
            ident = ",".join(str(k["id"]) for k in found) or "none"
            return {"id": ident, "sshKeys": found, "withSelector": args.args.get("withSelector")}, []
        if args.token == HCLOUD_GET_SSH_KEY:
            wanted = {k: args.args[k] for k in ("id", "name", "fingerprint") if args.args.get(k) is not None}
            selector = args.args.get("withSelector") or args.args.get("selector")
            matches = [
                k
                for k in self.hcloud.ssh_keys.get_all(label_selector=selector or None)
                if all(str(self._ssh_key_outputs(k)[field]) == str(value) for field, value in wanted.items())
            ]
            if len(matches) != 1:
                count = "no" if not matches else "more than one"
                raise UpFailed(f"getSshKey: {count} SSH key found for {wanted or selector!r}")
            return {**self._ssh_key_outputs(matches[0]), "selector": selector, "withSelector": selector}, []
        if args.token == HCLOUD_GET_SERVER_TYPE:
            st = self.hcloud.server_types.get_by_name(str(args.args.get("name")))
            if st is None:
                # As pulumi-hcloud fails the invoke: the program gets an error it can name a config key by.
                return {}, [("name", f"no server type named {args.args.get('name')!r}")]
            return {"id": st.id, "name": st.name, "architecture": st.architecture, "cores": st.cores}, []
        if args.token == HCLOUD_GET_SERVER:
            try:
                server = self.hcloud.servers.get_by_id(int(args.args["id"]))
            except APIException as exc:  # as pulumi-hcloud fails the invoke: the program names the config key
                return {}, [("id", f"{exc.message} ({exc.code})")]
            return {**self._server_outputs(server, {}), "id": server.id, "name": server.name}, []
        raise UpFailed(f"unsupported invoke {args.token}")

    @staticmethod
    def _ssh_key_outputs(key: SSHKey) -> dict[str, Any]:
        """An SSH key's properties as pulumi-hcloud names them (SshKey outputs, getSshKey(s) results)."""
        return {
            "id": key.id,
            "name": key.name,
            "publicKey": key.public_key,
            "fingerprint": key.fingerprint,
            "labels": key.labels or {},
        }

    # -- recording ---------------------------------------------------------------------------------

    def _step(
        self,
        key: str,
        rec: Recorded,
        op: str,
        paths: tuple[str, ...] | list[str],
        values: dict[str, tuple[Any, Any]] | None = None,
    ) -> None:
        with self._lock:
            self._plan.append(Change(op, key, tuple(paths), values or {}, rec.inputs))
            if not self._preview:
                self._working[key] = rec
                self.state[key] = rec
                self.operations[key] = {"create": "created", "update": "updated", "replace": "replaced"}.get(op, op)
        if op != "same" and not self._preview:
            for listener in self.listeners:
                listener(key, rec, self.operations[key])

    # -- dynamic resources (the real provider server) ----------------------------------------------

    def _urn(self, key: str) -> str:
        return f"urn:pulumi:{self.stack}::{self.project}::{key}"

    def _dynamic(self, key: str, rec: Recorded, old: Recorded | None) -> tuple[str, Recorded]:
        # The engine strips secret wrappers for providers that do not accept secrets.
        rec_inputs_wrapped = rec.inputs
        news = _unwrap_secrets(rec.inputs)
        urn = self._urn(key)
        checked = self.server.check(urn, old.inputs if old else {}, news)
        values: dict[str, tuple[Any, Any]] = {}
        if checked.failures:
            raise UpFailed("; ".join(f"{p}: {r}" for p, r in checked.failures))
        rec.inputs = checked.inputs
        paths: tuple[str, ...] = ()
        if old is None:
            op = "create"
        else:
            diffed = self.server.diff(urn, old.id, old.outputs, checked.inputs)
            if not diffed.changes:
                rec.id, rec.outputs = old.id, old.outputs
                self._step(key, rec, "same", ())
                return "same", rec
            op = "replace" if diffed.replaces else "update"
            paths = tuple(sorted({*diff_paths(old.inputs, checked.inputs, values=values), *_drift_paths(old.outputs)}))
            # As the CLI does, a secret's value is never shown: every path under an input holding one.
            hidden = {k for k, v in rec_inputs_wrapped.items() if _holds_secret(v)} | set(old.secret_outputs)
            for path in values:
                if re.split(r"[.\[]", path, maxsplit=1)[0] in hidden:
                    values[path] = (SECRET_SHOWN, SECRET_SHOWN)
        if self._preview:
            # Providers that do not preview hand back their inputs as outputs (provider_plugin.go).
            rec.id, rec.outputs = (old.id if old else ""), checked.inputs
        elif old is None or op == "replace":
            rec.id, rec.outputs = self.server.create(urn, checked.inputs)
        else:
            rec.id, rec.outputs = old.id, self.server.update(urn, old.id, old.outputs, checked.inputs)
        self._step(key, rec, op, paths, values)
        return op, rec

    # -- pulumi-hcloud stand-ins -------------------------------------------------------------------

    def _server(
        self, key: str, rec: Recorded, old: Recorded | None, options: Mapping[str, Any]
    ) -> tuple[str, Recorded]:
        inputs = rec.inputs
        paths: tuple[str, ...] = ()
        op = "create"
        if old is not None:
            paths = tuple(diff_paths(old.inputs, inputs))
            replace = any(p.split(".")[0].split("[")[0] in SERVER_REPLACE_ON for p in paths)
            op = "same" if not paths else "replace" if replace else "update"
        if self._preview:
            if op == "same":
                assert old is not None
                rec.id, rec.outputs = old.id, old.outputs
            elif op == "update":
                assert old is not None
                rec.id, rec.outputs = old.id, {**old.outputs, **inputs}
            else:  # created or replaced: a new server, whose ID and addresses only the API will know
                rec.id = ""
                rec.outputs = {**inputs, **{k: pulumi.output.UNKNOWN for k in SERVER_COMPUTED}}
            self._step(key, rec, op, paths)
            return op, rec
        unsupported = sorted({p.split(".")[0].split("[")[0] for p in paths} & set(SERVER_CREATE_ONLY))
        if op == "update" and unsupported:
            raise UpFailed(f"{key}: the local engine's pulumi-hcloud stand-in sets {unsupported} only at creation")
        if op == "replace" and old is not None and options.get("delete_before_replace"):
            self._delete_server(old)
        if op in ("create", "replace"):
            server = self._create_server(inputs)
        else:
            assert old is not None
            server = self.hcloud.servers.get_by_id(int(old.id))
            labels = inputs.get("labels") or {}
            if labels != server.labels:
                server.update(labels=labels)
            self._server_settings(server, inputs)
            if server.server_type is not None and inputs.get("serverType") != server.server_type.name:
                self._resize(server, inputs["serverType"], upgrade_disk=not inputs.get("keepDisk"))
            server = self.hcloud.servers.get_by_id(int(old.id))
        rec.id, rec.outputs = str(server.id), self._server_outputs(server, inputs)
        self._step(key, rec, op, paths)
        if op == "replace" and old is not None and not options.get("delete_before_replace"):
            self._delete_server(old)
        return op, rec

    def _resize(self, server: Any, server_type: str, *, upgrade_disk: bool) -> None:
        """What terraform-provider-hcloud does for a new `server_type`: power off, change the type (the
        disk upgraded unless `keep_disk`), and power on again if the change left the server off."""
        if server.status != "off":
            self.hcloud.servers.power_off(server).wait_until_finished()
        self.hcloud.servers.change_type(
            server, ServerType(name=server_type), upgrade_disk=upgrade_disk
        ).wait_until_finished()
        if self.hcloud.servers.get_by_id(server.id).status == "off":
            self.hcloud.servers.power_on(server).wait_until_finished()

    def _find_ssh_key_for_server(self, id_or_name: str) -> SSHKey:
        # As pulumi-hcloud finds a server's `sshKeys` (hcloud-go's Get): by ID when the text is a number,
        # then by name.
        found: SSHKey | None = None
        if id_or_name.isdigit():
            found = self._find_ssh_key(int(id_or_name))
        found = found or self.hcloud.ssh_keys.get_by_name(id_or_name)
        if found is None:
            raise UpFailed(f"SSH key {id_or_name!r} not found")
        return found

    def _create_server(self, inputs: Mapping[str, Any]) -> Any:
        """As terraform-provider-hcloud's `hcloud_server` create: the server (with its public networking and
        placement group) powered off when networks are to be attached, each network attached with its IP
        and alias IPs, then powered on; protection and backups set by their actions."""
        keys = [self._find_ssh_key_for_server(str(k)) for k in inputs.get("sshKeys", [])]
        public = (inputs.get("publicNets") or [{}])[0]
        networks = inputs.get("networks") or []
        group = inputs.get("placementGroupId")
        resp = self.hcloud.servers.create(
            name=inputs["name"],
            server_type=ServerType(name=inputs["serverType"]),
            image=HImage(name=inputs["image"]),
            location=Location(name=inputs["location"]),
            labels=inputs.get("labels") or {},
            ssh_keys=keys,
            public_net=ServerCreatePublicNetwork(
                ipv4=PrimaryIP(id=int(public["ipv4"])) if public.get("ipv4") else None,
                ipv6=PrimaryIP(id=int(public["ipv6"])) if public.get("ipv6") else None,
                enable_ipv4=public.get("ipv4Enabled", True) is not False,
                enable_ipv6=public.get("ipv6Enabled", True) is not False,
            ),
            placement_group=PlacementGroup(id=int(group)) if group else None,
            start_after_create=not networks,
        )
        for action in [resp.action, *(resp.next_actions or [])]:
            action.wait_until_finished()
        server = self.hcloud.servers.get_by_id(int(str(resp.server.id)))
        for net in networks:
            network = Network(id=int(net["networkId"]))
            server.attach_to_network(network, ip=net.get("ip"), alias_ips=net.get("aliasIps")).wait_until_finished()
        if networks:
            server.power_on().wait_until_finished()
        self._server_settings(server, inputs)
        # pulumi-hcloud returns once the server runs.
        return self.hcloud.servers.get_by_id(int(str(server.id)))

    @staticmethod
    def _server_settings(server: Any, inputs: Mapping[str, Any]) -> None:
        """Protection and backups as the inputs say (pulumi-hcloud's `deleteProtection`,
        `rebuildProtection`, `backups`), changed only when they differ."""
        protection = server.protection or {}
        wanted = {"delete": bool(inputs.get("deleteProtection")), "rebuild": bool(inputs.get("rebuildProtection"))}
        if wanted != {k: bool(protection.get(k)) for k in wanted}:
            server.change_protection(**wanted).wait_until_finished()
        if bool(inputs.get("backups")) != bool(server.backup_window):
            (server.enable_backup() if inputs.get("backups") else server.disable_backup()).wait_until_finished()

    @staticmethod
    def _server_outputs(server: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        net = server.public_net
        # pulumi-hcloud's outputs: `ipv6Address` is the network's first host (`<network>::1`), `ipv6Network`
        # the /64 the API reports; an address that is off is "".
        network = ipaddress.IPv6Network(net.ipv6.ip) if net and net.ipv6 else None
        group = server.placement_group
        return {
            **inputs,
            "labels": server.labels or {},
            "firewallIds": [int(f) for f in inputs.get("firewallIds") or []],
            "serverType": server.server_type.name,
            "location": server.location.name if server.location else inputs.get("location"),
            "ipv4Address": net.ipv4.ip if net and net.ipv4 else "",
            "ipv6Address": str(network[1]) if network else "",
            "ipv6Network": str(network) if network else "",
            "placementGroupId": group.id if group else None,
            "networks": [
                {
                    "networkId": p.network.id,
                    "ip": p.ip,
                    "aliasIps": list(p.alias_ips or []),
                    "macAddress": p.mac_address,
                }
                for p in server.private_net or []
            ],
            "primaryDiskSize": server.primary_disk_size,
            "status": server.status,
            "backups": bool(server.backup_window),
            "deleteProtection": bool(server.protection and server.protection.get("delete")),
            "rebuildProtection": bool(server.protection and server.protection.get("rebuild")),
        }

    def _delete_server(self, rec: Recorded) -> None:
        server = self.hcloud.servers.get_by_id(int(rec.id))
        server.delete().wait_until_finished()

    def _ssh_key(self, key: str, rec: Recorded, old: Recorded | None) -> tuple[str, Recorded]:
        inputs = rec.inputs
        paths: tuple[str, ...] = ()
        if old is None:
            op = "create"
        else:
            paths = tuple(diff_paths(old.inputs, inputs))
            # `public_key` is ForceNew in terraform-provider-hcloud: a new (or not yet known) key replaces it.
            op = "same" if not paths else "replace" if "publicKey" in paths else "update"
        if op == "same":
            assert old is not None
            rec.id, rec.outputs = old.id, old.outputs
        elif self._preview:
            rec.id = old.id if old else ""
            rec.outputs = {**inputs, "name": inputs.get("name", pulumi.output.UNKNOWN)}
            if op != "update":
                rec.outputs["fingerprint"] = pulumi.output.UNKNOWN
        elif op == "update":
            assert old is not None
            rec.id, rec.outputs = old.id, {**old.outputs, **inputs}
        else:
            name = inputs.get("name") or key.rsplit("::", 1)[-1]
            created = self.hcloud.ssh_keys.create(
                name=name, public_key=inputs["publicKey"], labels=inputs.get("labels")
            )
            outs = {**inputs, **self._ssh_key_outputs(created)}
            del outs["id"]
            rec.id, rec.outputs = str(created.id), outs
        self._step(key, rec, op, paths)
        if op == "replace" and old is not None and not self._preview:
            self._delete_ssh_key(old)
        return op, rec

    def _delete_ssh_key(self, rec: Recorded) -> None:
        found = self._find_ssh_key(int(rec.id))
        if found is not None:
            self.hcloud.ssh_keys.delete(found)

    def _find_ssh_key(self, key_id: int) -> Any:
        try:
            return self.hcloud.ssh_keys.get_by_id(key_id)
        except APIException as exc:
            if exc.code == "not_found":
                return None
            raise

    # -- pulumi-command stand-in -------------------------------------------------------------------

    def _command(self, key: str, rec: Recorded, old: Recorded | None) -> tuple[str, Recorded]:
        """`command.remote.Command`: runs `create` (on a change, `update` or else `create` again) over SSH,
        checking the host key it is given, as pulumi-command does."""
        inputs = _unwrap_secrets(rec.inputs)
        paths = () if old is None else tuple(diff_paths(_unwrap_secrets(old.inputs), inputs))
        op = "create" if old is None else "update" if paths else "same"
        if op == "same":
            assert old is not None
            rec.id, rec.outputs = old.id, old.outputs
        elif self._preview:
            rec.id = old.id if old else ""
            rec.outputs = {**rec.inputs, "stdout": pulumi.output.UNKNOWN, "stderr": pulumi.output.UNKNOWN}
        else:
            script = inputs.get("update") if op == "update" and inputs.get("update") else inputs["create"]
            stdout, stderr = asyncio.run(_remote(inputs["connection"], script))
            rec.id = old.id if old else f"{rec.name}-{abs(hash(script)) % 10**8}"
            rec.outputs = {**rec.inputs, "stdout": stdout, "stderr": stderr}
        self._step(key, rec, op, paths)
        return op, rec

    # -- deletes -----------------------------------------------------------------------------------

    def _delete(self, key: str, rec: Recorded) -> None:
        if rec.type == DYNAMIC:
            self.server.delete(self._urn(key), rec.id, rec.outputs)
        elif rec.type == HCLOUD_SERVER:
            if self.hcloud.servers.get_by_id(int(rec.id)) is not None:
                self._delete_server(rec)
        elif rec.type == HCLOUD_SSH_KEY:
            self._delete_ssh_key(rec)
        elif rec.type == COMMAND:
            inputs = _unwrap_secrets(rec.inputs)
            if inputs.get("delete"):
                asyncio.run(_remote(inputs["connection"], inputs["delete"]))

    def _deletion_order(self, keys: set[str]) -> list[str]:
        """Dependents first: a resource goes before its dependencies and its parent. States recorded by
        earlier releases carry no dependencies: their order falls back to the resource kinds."""
        kind_rank = {COMMAND: 0, DYNAMIC: 1, HCLOUD_SERVER: 2, HCLOUD_SSH_KEY: 3}
        needed_by: dict[str, set[str]] = {k: set() for k in keys}
        for k in keys:
            rec = self.state[k]
            for dep in [*rec.dependencies, *([rec.parent] if rec.parent else [])]:
                if dep in needed_by:
                    needed_by[dep].add(k)
        order: list[str] = []
        remaining = set(keys)
        while remaining:
            ready = [k for k in remaining if not (needed_by[k] & remaining)] or list(remaining)
            ready.sort(key=lambda k: (kind_rank.get(self.state[k].type, 9), k))
            # Within one round, the step resources in reverse flow order (first boot before install).
            order.append(ready[0])
            remaining.discard(ready[0])
        return order

    def _delete_all(self, keys: set[str]) -> None:
        for key in self._deletion_order(keys):
            rec = self.state[key]
            self._plan.append(Change("delete", key))
            if self._preview:
                continue
            self._delete(key, rec)
            with self._lock:
                del self.state[key]
                self.operations[key] = "deleted"

    # -- running a program -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _run(self, preview: bool) -> Iterator[None]:
        with self._lock:
            self._run_id += 1
        self._preview = preview
        self._plan = Plan()
        self._registered = set()
        self._working = dict(self.state)
        self.errors = []
        if not preview:
            self.operations = {}
        yield

    def _program(self, program: Callable[[], Any], preview: bool) -> Any:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_after_failure)
        # Resource registrations block a thread each until the resource is done. The Python language host
        # sizes this pool by `pulumi up --parallel` (default unbounded); asyncio's default of cpu count + 4
        # would let only 6 servers be created at once on 2 cores.
        executor = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="register")
        loop.set_default_executor(executor)
        asyncio.set_event_loop(loop)
        monitor = _Monitor(self, self._run_id)
        pulumi.runtime.set_mocks(self, project=self.project, stack=self.stack, preview=preview, monitor=monitor)
        result: dict[str, Any] = {}

        @pulumi.runtime.test
        def run() -> pulumi.Output[Any]:
            out = pulumi.Output.from_input(program())
            return out.apply(lambda v: result.setdefault("value", v))

        try:
            run()
        except Exception as exc:
            detail = "\n".join(self.errors) or str(exc)
            raise UpFailed(detail) from None
        finally:
            executor.shutdown(wait=False)
            # Like the engine, end a run only when no step is in flight any more (a failed registration
            # makes the SDK return while others are still being carried out).
            with self._lock:
                self._idle.wait_for(lambda: self._inflight == 0)
        if self.errors:
            raise UpFailed("\n".join(self.errors))
        return result.get("value")

    def preview(self, program: Callable[[], Any]) -> Plan:
        """What `up` would do; nothing is created, changed or deleted."""
        with self._run(preview=True):
            self._program(program, preview=True)
            self._delete_all(set(self.state) - self._registered)
            return self._plan

    def up(self, program: Callable[[], Any], *, skip_preview: bool = False) -> Any:
        """Run `program` (declares resources, returns outputs) to completion; returns its resolved outputs.
        `self.last_plan` holds what was done."""
        if not skip_preview:
            self.last_preview = self.preview(program)
        with self._run(preview=False):
            value = self._program(program, preview=False)
            self._delete_all(set(self.state) - self._registered)
            self.last_plan = self._plan
        return value

    def refresh(self) -> Plan:
        """Read every resource; record what was read. A resource whose provider finds it differs from its
        inputs (dynamic: Diff of the read state against the recorded inputs) is shown as `update`."""
        with self._run(preview=False):
            for key, rec in list(self.state.items()):
                if not rec.custom:
                    self._plan.append(Change("same", key))
                    continue
                read = self._read(key, rec)
                if read is None:
                    self._plan.append(Change("delete", key))
                    del self.state[key]
                    continue
                paths = tuple(diff_paths(rec.outputs, read.outputs))
                changed = bool(paths)
                if rec.type == DYNAMIC:
                    changed = bool(self.server.diff(self._urn(key), rec.id, read.outputs, read.inputs).changes)
                self.state[key] = read
                self._plan.append(Change("update" if changed else "same", key, paths if changed else ()))
            return self._plan

    def _read(self, key: str, rec: Recorded) -> Recorded | None:
        if rec.type == DYNAMIC:
            outputs, inputs = self.server.read(self._urn(key), rec.id, rec.outputs, rec.inputs)
            return Recorded(**{**asdict(rec), "outputs": outputs, "inputs": inputs or rec.inputs})
        if rec.type == HCLOUD_SERVER:
            server = self.hcloud.servers.get_by_id(int(rec.id))
            if server is None:
                return None
            return Recorded(**{**asdict(rec), "outputs": self._server_outputs(server, rec.inputs)})
        if rec.type == HCLOUD_SSH_KEY:
            return None if self._find_ssh_key(int(rec.id)) is None else rec
        return rec

    def destroy(self) -> Plan:
        """Delete every resource of the state, dependents first."""
        with self._run(preview=False):
            self._delete_all(set(self.state))
            return self._plan


def _quiet_after_failure(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """After a failed run the SDK leaves the outputs of every resource that depended on the failure holding
    that same error, and its pending tasks: asyncio would print each of them (thousands of lines for one
    error the run already reported). Anything else goes to asyncio's default handler."""
    message = str(context.get("message", ""))
    if message.startswith(("Future exception was never retrieved", "Task was destroyed but it is pending")):
        return
    loop.default_exception_handler(context)


def generated_keys(state: Mapping[str, Recorded], fleet: str) -> dict[str, Any]:
    """The keys a fleet's state holds, in one map: `deploy_public_key`, `deploy_private_key`,
    `host_public_keys` and `host_private_keys` (`{host: key}`), from `<fleet>-keys` and each host's
    `<fleet>-<host>-hostkey`. For tests and tools that inspect a stack; the values are secrets."""
    keys = state[f"{DYNAMIC}::{fleet}-keys"].outputs
    found = {
        "deploy_public_key": keys["deploy_public_key"],
        "deploy_private_key": keys["deploy_private_key"],
        "host_public_keys": dict(keys.get("host_public_keys") or {}),
        "host_private_keys": dict(keys.get("host_private_keys") or {}),
    }
    prefix, suffix = f"{DYNAMIC}::{fleet}-", "-hostkey"
    for key, rec in state.items():
        if key.startswith(prefix) and key.endswith(suffix):
            host = rec.outputs["host"]
            found["host_public_keys"][host] = rec.outputs["public_key"]
            found["host_private_keys"][host] = rec.outputs["private_key"]
    return found


async def _remote(connection: Mapping[str, Any], script: str) -> tuple[str, str]:
    """Run `script` as pulumi-command's remote Command does: as `user`, with the host key checked."""
    from .ssh import connect, run

    loop = asyncio.get_running_loop()
    conn, _ = await connect(
        connection["host"],
        port=int(connection.get("port") or 22),
        client_key=connection["privateKey"],
        host_key=connection["hostKey"],
        deadline=loop.time() + 60,
        username=connection.get("user") or "root",
    )
    async with conn:
        done = await run(conn, script, timeout=300)
    return done.stdout, done.stderr
