"""`pulumi up` without the Pulumi CLI: a minimal engine for the demo and the end-to-end tests.

The Pulumi program (the real components) runs under Pulumi's mock monitor. Each resource registration
is carried out for real: dynamic resources go through the real provider server over gRPC (Check, then
Create, or Diff and Update against the recorded state), hcloud resources go to a Hetzner Cloud API through
the official `hcloud` library, standing in for pulumi-hcloud. The state is kept between runs, so a second
`up` with changed inputs exercises the update paths exactly as the engine would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pulumi
from hcloud import APIException, Client
from hcloud.images import Image as HImage
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.ssh_keys import SSHKey
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc

from .provider_server import ProviderServer

DYNAMIC = "pulumi-python:dynamic:Resource"
HCLOUD_SERVER = "hcloud:index/server:Server"
HCLOUD_SSH_KEY = "hcloud:index/sshKey:SshKey"
HCLOUD_GET_SSH_KEY = "hcloud:index/getSshKey:getSshKey"
HCLOUD_GET_SSH_KEYS = "hcloud:index/getSshKeys:getSshKeys"


class UpFailed(RuntimeError):
    pass


def _unwrap_secrets(value: Any) -> Any:
    value = rpc.unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {k: _unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap_secrets(v) for v in value]
    return value


@dataclass
class Recorded:
    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class LocalEngine(pulumi_mocks.Mocks):
    server: ProviderServer
    hcloud: Client
    state: dict[str, Recorded] = field(default_factory=dict)
    # What happened to each resource in the last run: created, updated, same.
    operations: dict[str, str] = field(default_factory=dict)
    # Called with (key, record, operation) after each resource is created or updated, before anything
    # that depends on it runs: tests inject faults at exact points of the flow through these.
    listeners: list[Callable[[str, Recorded, str], None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Resource operations at once, like `pulumi up --parallel` (whose default is unbounded).
    parallel: int = 256

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- Mocks protocol --------------------------------------------------------------------------------

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        key = f"{args.typ}::{args.name}"
        try:
            if args.typ == DYNAMIC:
                # The engine strips secret wrappers for providers that do not accept secrets.
                return self._dynamic(key, _unwrap_secrets(args.inputs))
            if args.typ == HCLOUD_SERVER:
                return self._server(key, args.inputs)
            if args.typ == HCLOUD_SSH_KEY:
                return self._ssh_key(key, args.inputs)
            return f"{args.name}-id", dict(args.inputs)  # components
        except Exception as exc:
            self.errors.append(f"{args.name}: {exc}")
            raise

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

    # -- resources -------------------------------------------------------------------------------------

    def _dynamic(self, key: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        urn = f"urn:pulumi:local::nix-dabei::{key}"
        old = self.state.get(key)
        checked = self.server.check(urn, old.inputs if old else {}, inputs)
        if checked.failures:
            raise UpFailed("; ".join(f"{p}: {r}" for p, r in checked.failures))
        if old is None:
            id_, outs = self.server.create(urn, checked.inputs)
            self._record(key, Recorded(id_, checked.inputs, outs), "created")
            return id_, outs
        if not self.server.diff(urn, old.id, old.outputs, checked.inputs):
            self._record(key, Recorded(old.id, checked.inputs, old.outputs), "same")
            return old.id, old.outputs
        outs = self.server.update(urn, old.id, old.outputs, checked.inputs)
        self._record(key, Recorded(old.id, checked.inputs, outs), "updated")
        return old.id, outs

    def _server(self, key: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        def find_ssh_key(id_or_name: str) -> SSHKey:
            # As pulumi-hcloud finds a server's `sshKeys` (hcloud-go's Get): by ID when the text is a
            # number, then by name.
            found: SSHKey | None = None
            if id_or_name.isdigit():
                try:
                    found = self.hcloud.ssh_keys.get_by_id(int(id_or_name))
                except APIException as exc:
                    if exc.code != "not_found":
                        raise
            found = found or self.hcloud.ssh_keys.get_by_name(id_or_name)
            if found is None:
                raise UpFailed(f"SSH key {id_or_name!r} not found")
            return found

        old = self.state.get(key)
        if old is None:
            keys = [find_ssh_key(str(k)) for k in inputs.get("sshKeys", [])]
            resp = self.hcloud.servers.create(
                name=inputs["name"],
                server_type=ServerType(name=inputs["serverType"]),
                image=HImage(name=inputs["image"]),
                location=Location(name=inputs["location"]),
                labels=inputs.get("labels") or {},
                ssh_keys=keys,
            )
            # pulumi-hcloud returns once the server runs: after the create action and the power-on after it.
            for action in [resp.action, *(resp.next_actions or [])]:
                action.wait_until_finished()
            server = self.hcloud.servers.get_by_id(int(str(resp.server.id)))
            op = "created"
        else:
            server = self.hcloud.servers.get_by_id(int(old.id))
            labels = inputs.get("labels") or {}
            op = "same"
            if labels != server.labels:
                server = server.update(labels=labels)
                server = self.hcloud.servers.get_by_id(int(old.id))
                op = "updated"
        net = server.public_net
        if net is None or net.ipv4 is None or net.ipv6 is None:
            raise UpFailed(f"server {inputs['name']!r} has no public IPv4 and IPv6 address")
        # pulumi-hcloud's outputs: `ipv6Address` is the network's first host (`<network>::1`), `ipv6Network`
        # the /64 the API reports.
        network = ipaddress.IPv6Network(net.ipv6.ip)
        outs = {
            **inputs,
            "labels": server.labels or {},
            "firewallIds": [int(f) for f in inputs.get("firewallIds") or []],
            "ipv4Address": net.ipv4.ip,
            "ipv6Address": str(network[1]),
            "ipv6Network": str(network),
            "primaryDiskSize": server.primary_disk_size,
            "status": server.status,
            "backups": bool(server.backup_window),
            "deleteProtection": bool(server.protection and server.protection.get("delete")),
            "rebuildProtection": bool(server.protection and server.protection.get("rebuild")),
        }
        self._record(key, Recorded(str(server.id), inputs, outs), op)
        return str(server.id), outs

    def _ssh_key(self, key: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        old = self.state.get(key)
        if old is not None and old.inputs.get("publicKey") == inputs.get("publicKey"):
            self._record(key, old, "same")
            return old.id, old.outputs
        name = inputs.get("name") or key.rsplit("::", 1)[-1]
        created = self.hcloud.ssh_keys.create(name=name, public_key=inputs["publicKey"], labels=inputs.get("labels"))
        outs = {**inputs, **self._ssh_key_outputs(created)}
        del outs["id"]
        self._record(key, Recorded(str(created.id), inputs, outs), "created")
        return str(created.id), outs

    def _record(self, key: str, rec: Recorded, op: str) -> None:
        with self._lock:
            self.state[key] = rec
            self.operations[key] = op
        if op != "same":
            for listener in self.listeners:
                listener(key, rec, op)

    # -- running a program -----------------------------------------------------------------------------

    def up(self, program: Callable[[], Any], *, project: str = "nix-dabei", stack: str = "local") -> Any:
        """Run `program` (declares resources, returns outputs) to completion; returns its resolved outputs."""
        self.operations = {}
        self.errors = []
        loop = asyncio.new_event_loop()
        # Resource registrations block a thread each until the resource is done. The Python language host
        # sizes this pool by `pulumi up --parallel` (default unbounded); asyncio's default of cpu count + 4
        # would let only 6 servers be created at once on 2 cores.
        executor = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="register")
        loop.set_default_executor(executor)
        asyncio.set_event_loop(loop)
        pulumi.runtime.set_mocks(self, project=project, stack=stack, preview=False)
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
        if self.errors:
            raise UpFailed("\n".join(self.errors))
        return result.get("value")
