"""What every step shares: one provider call acts on a whole map of hosts at once.

The dynamic provider server runs at most four calls at a time and each step blocks for minutes, so a step
that took one host per call would queue a fleet behind four hosts. Instead each step resource carries the
map `hosts: {name: {...}}` and works on all of them concurrently inside one call. `update` reconciles: it
acts only on hosts whose inputs changed (or that are new) and keeps the others' outputs as they were.

A host that fails does not stop the others: the call finishes every host, then raises one error that names
each failed host. Steps are idempotent by observation (they look at the host before acting), so running
`pulumi up` again after a failure finishes the job without redoing what is done.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    ConfigureRequest,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)
from pulumi.output import Unknown
from pulumi.runtime import rpc

from .. import validation
from ..settings import ProviderSettings


class HostError(Exception):
    """One host could not complete the step; the text is safe to show (no secrets)."""


class HostUntouched(HostError):
    """A host the step left as it was because others failed first (a rollout that stopped)."""


class StepError(Exception):
    """A step that did not finish on every host: `failures` by host, those `untouched` among them."""

    def __init__(self, step: str, failures: Mapping[str, str], total: int, untouched: frozenset[str] = frozenset()):
        failed = len(failures) - len(untouched)
        more = f", {len(untouched)} more left untouched" if untouched else ""
        lines = [f"{step} failed on {failed} of {total} host(s){more}:"]
        lines += [f"  {name}: {reason}" for name, reason in sorted(failures.items())]
        super().__init__("\n".join(lines))
        self.failures = dict(failures)
        self.untouched = untouched


@dataclass
class HostContext:
    """What a step knows while it works on one host."""

    name: str
    step: str
    deadline: float  # time.monotonic() based, the event loop's clock
    old: Mapping[str, Any] | None = None  # this host's previous outputs; None when the resource is created

    def log(self, message: str) -> None:
        pulumi.log.info(f"[{self.name}] {self.step}: {message}")

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def is_unknown(value: Any) -> bool:
    """Whether `value` is, or holds at any depth, a value not known yet.

    During a preview the engine sends values it does not know yet (outputs of resources still to be created
    or being updated), and the SDK's provider server deserializes them with `keep_unknowns=True`
    (`pulumi/dynamic/__main__.py`, `pulumi/runtime/rpc.py: deserialize_property`): they arrive as
    `pulumi.output.Unknown` objects, at the top level or inside lists, maps and secrets. The wire sentinel
    string `rpc.UNKNOWN` is recognized too, for values handed over without deserialization.
    """
    if isinstance(value, Unknown) or (isinstance(value, str) and value == rpc.UNKNOWN):
        return True
    if rpc.is_rpc_secret(value):
        return is_unknown(rpc.unwrap_rpc_secret(value))
    if isinstance(value, Mapping):
        return any(is_unknown(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(is_unknown(v) for v in value)
    return False


def reinstall_requests(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Every reinstall request ID a host has been given, recorded so that none acts twice: putting an
    earlier ID back (a reverted pull request) is no new request."""
    seen = set((old or {}).get("reinstalls") or [])
    seen.update(r for r in ((old or {}).get("reinstall"), new.get("reinstall")) if isinstance(r, str) and r)
    return sorted(seen)


def secret_options(provider: type[FleetStep], opts: pulumi.ResourceOptions | None) -> pulumi.ResourceOptions:
    """The resource options of a step, with its secret inputs marked secret as outputs too."""
    secret = pulumi.ResourceOptions(additional_secret_outputs=list(provider.secret_inputs))
    return pulumi.ResourceOptions.merge(opts, secret)


def as_int(value: Any) -> int:
    """State hands integers back as floats."""
    return int(value)


# The per-host inputs every host step receives from the component, each with its check.
HOST_INPUT_CHECKS: dict[str, Callable[[str, Any], list[validation.Problem]]] = {
    "server_id": validation.hetzner_id,
    "hostname": validation.hostname,
    "flake": validation.flake_ref,
    "host_public_key": validation.public_key,
    "authorized_keys": validation.public_keys,
}
# Optional per-host inputs (the steps fall back to a default when absent).
OPTIONAL_HOST_INPUT_CHECKS: dict[str, Callable[[str, Any], list[validation.Problem]]] = {
    # The public addresses; None or "" for one that is off (an IPv6-only host has no `ipv4`).
    "ipv4": validation.ipv4,
    "ipv6": validation.ipv6,
    "disk": validation.disk,
    "reinstall": validation.reinstall,
}
# No two hosts of a fleet may share these: two entries for one server would write its disk twice.
UNIQUE_HOST_INPUTS = ("server_id", "ipv4", "ipv6")


def host_address(host: Mapping[str, Any]) -> str:
    """The address the steps reach a host on: its public IPv4, or on an IPv6-only host its IPv6 address."""
    address = host.get("ipv4") or host.get("ipv6")
    if not address:
        raise HostError("the server has neither a public IPv4 nor an IPv6 address to connect to")
    return str(address)


def check_host(name: str, host: Any) -> list[validation.Problem]:
    where = f"hosts.{name}"
    if not isinstance(host, Mapping):
        return [(where, f"expected a map of host settings, got {type(host).__name__}")]
    problems = validation.hostname(where, name)
    for field_name, check in HOST_INPUT_CHECKS.items():
        value = host.get(field_name)
        if field_name not in host or value is None:
            problems.append((f"{where}.{field_name}", "required"))
        elif not is_unknown(value):
            problems += check(f"{where}.{field_name}", value)
    for field_name, check in OPTIONAL_HOST_INPUT_CHECKS.items():
        value = host.get(field_name)
        if value not in (None, "") and not is_unknown(value):
            problems += check(f"{where}.{field_name}", value)
    if all(host.get(f) in (None, "") for f in ("ipv4", "ipv6")):
        problems.append((f"{where}.ipv4", "required: the server's public IPv4 address, or its ipv6 address"))
    hostname = host.get("hostname")
    if isinstance(hostname, str) and not is_unknown(hostname) and hostname != name:
        problems.append((f"{where}.hostname", f"expected the host's name {name!r}, got {hostname!r}"))
    return problems


def check_step_inputs(news: Mapping[str, Any]) -> list[validation.Problem]:
    """The checks every host step shares: the host map, each host, duplicates, deadline, deploy key."""
    problems: list[validation.Problem] = []
    hosts = news.get("hosts")
    if not is_unknown(hosts):
        if not isinstance(hosts, Mapping) or not hosts:
            got = "an empty map" if isinstance(hosts, Mapping) else type(hosts).__name__
            problems.append(("hosts", f"expected a non-empty map of host name to host settings, got {got}"))
        else:
            for name, host in hosts.items():
                problems += check_host(name, host)
            for field_name in UNIQUE_HOST_INPUTS:
                owners: dict[Any, str] = {}
                for name, host in sorted(hosts.items()):
                    value = host.get(field_name) if isinstance(host, Mapping) else None
                    if value in (None, "") or is_unknown(value) or isinstance(value, dict | list):
                        continue
                    if value in owners:
                        problems.append(
                            (
                                f"hosts.{name}.{field_name}",
                                f"duplicate {field_name} {value!r}, also given for host {owners[value]!r}: "
                                "every host needs its own",
                            )
                        )
                    owners.setdefault(value, name)
    deadline = news.get("deadline_seconds")
    if not is_unknown(deadline):
        problems += validation.positive_seconds("deadline_seconds", deadline)
    key = news.get("deploy_private_key")
    if "deploy_private_key" in news and not is_unknown(key):
        problems += validation.private_key("deploy_private_key", key)
    key_ids = news.get("rescue_ssh_key_ids")
    if "rescue_ssh_key_ids" in news and not is_unknown(key_ids):
        if not isinstance(key_ids, list) or not key_ids:
            problems.append(("rescue_ssh_key_ids", f"expected a non-empty list of SSH key IDs, got {key_ids!r}"))
        else:
            for i, key_id in enumerate(key_ids):
                problems += validation.hetzner_id(f"rescue_ssh_key_ids[{i}]", key_id, "SSH key")
    return problems


class FleetStep(ResourceProvider):
    """Base of the step providers. Subclasses set the class attributes and implement `apply_host`."""

    step: ClassVar[str]
    # Per-host input fields whose change means the host needs this step again.
    host_fields: ClassVar[tuple[str, ...]]
    # Top-level inputs that hold secrets. They are echoed into outputs (refresh needs them) only as
    # secret outputs: see `secret_options`.
    secret_inputs: ClassVar[tuple[str, ...]] = ()
    # Top-level inputs whose change means every host needs this step again.
    shared_fields: ClassVar[tuple[str, ...]] = ()
    # The top-level input with the step before's results per host (`{name: {field: value}}`), merged
    # into each host's settings when the step acts; it decides nothing (a preview does not know it).
    upstream: ClassVar[str | None] = None

    settings: ProviderSettings | None = None

    def configure(self, req: ConfigureRequest) -> None:
        self.settings = ProviderSettings.from_config(req.config)

    # -- what subclasses provide -------------------------------------------------------------------

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        return []

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        """Bring one host to this step's goal; return the host's outputs (merged over its inputs)."""
        raise NotImplementedError

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """Whether `update` must act on this host: it is new, one of `host_fields` changed, or a refresh
        recorded drift for it. Subclasses refine (the reinstall request, for one)."""
        if old is None or old.get("drift"):
            return True
        return any(old.get(f) != new.get(f) for f in self.host_fields)

    def read_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """What `pulumi refresh` reports for one host; by default the recorded outputs."""

        async def recorded() -> dict[str, Any]:
            return host

        return recorded()

    # -- the Pulumi provider protocol --------------------------------------------------------------

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Reject malformed inputs at preview, before any SSH connection and before any API call but the
        catalog read of `check_inputs` (rescue step). Values not known yet (outputs of resources still to
        be created) are checked on the run that knows them."""
        failures = [CheckFailure(prop, reason) for prop, reason in check_step_inputs(news)]
        if not failures:
            failures += self.check_inputs(news)
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Changes when a host is added or removed, when a host would act (`wants_action`, which sees
        what `read` recorded, so drift found by a refresh shows here), or when a value that decides
        that is not known yet (preview)."""
        old_hosts = olds.get("hosts") or {}
        new_hosts = news.get("hosts")
        if not isinstance(new_hosts, Mapping) or any(is_unknown(news.get(f)) for f in self.shared_fields):
            return DiffResult(changes=True, replaces=[], delete_before_replace=False)
        changed = set(old_hosts) != set(new_hosts)
        changed = changed or any(olds.get(f) != news.get(f) for f in self.shared_fields)
        for name, new in new_hosts.items():
            undecided = not isinstance(new, Mapping) or any(is_unknown(new.get(f)) for f in self.host_fields)
            changed = changed or undecided or self.wants_action(name, old_hosts.get(name), new)
        return DiffResult(changes=changed, replaces=[], delete_before_replace=False)

    def create(self, props: dict[str, Any]) -> CreateResult:
        hosts = dict(props["hosts"])
        results = self._run(props, hosts, list(hosts))
        for name, result in results.items():
            result["reinstalls"] = reinstall_requests(None, hosts[name])
        return CreateResult(f"{self.step}-{uuid.uuid4().hex[:12]}", self._outputs(props, results))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        old_hosts: Mapping[str, Any] = olds.get("hosts") or {}
        hosts = dict(news["hosts"])
        shared_changed = any(olds.get(f) != news.get(f) for f in self.shared_fields)
        todo = [n for n, h in hosts.items() if shared_changed or self.wants_action(n, old_hosts.get(n), h)]
        results = self._run(news, hosts, todo, old_hosts)
        for name in hosts:
            if name not in todo:
                results[name] = self.keep(old_hosts[name], hosts[name], news)
            results[name]["reinstalls"] = reinstall_requests(old_hosts.get(name), hosts[name])
        return UpdateResult(self._outputs(news, results))

    def keep(self, old: Mapping[str, Any], new: Mapping[str, Any], props: Mapping[str, Any]) -> dict[str, Any]:
        """Outputs of a host that `update` left alone: its new inputs over what it recorded, except the
        fields that would have made it act (a reinstall held back by policy): those keep their recorded
        values, so the preview keeps showing the pending change."""
        return {**old, **new, **{f: old[f] for f in self.host_fields if f in old}}

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        hosts = dict(props.get("hosts") or {})

        async def one(ctx: HostContext, host: dict[str, Any]) -> dict[str, Any]:
            return await self.read_host(ctx, host, props)

        results = self._gather(props, hosts, list(hosts), one, hosts)
        return ReadResult(id_, self._outputs(props, results))

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        # Steps own nothing that outlives the server: deleting the server (pulumi-hcloud) ends it all.
        return None

    # -- helpers -----------------------------------------------------------------------------------

    def _outputs(self, props: Mapping[str, Any], hosts: Mapping[str, Any]) -> dict[str, Any]:
        outs = {k: v for k, v in props.items() if k != "__provider"}
        outs["hosts"] = {name: hosts[name] for name in sorted(hosts)}
        return outs

    def call_state(
        self, props: Mapping[str, Any], hosts: Mapping[str, Any], todo: list[str], olds: Mapping[str, Any]
    ) -> dict[str, Any]:
        """What one call of the step shares among the hosts it acts on (`todo`), handed to `apply_host` in
        `props` under keys that start with `__` (never inputs: the engine never sees them). None here."""
        return {}

    def with_upstream(self, props: Mapping[str, Any], hosts: Mapping[str, Any], name: str) -> dict[str, Any]:
        """The host's inputs with what the step before recorded for it (`upstream`), as `apply_host` gets them."""
        before = (props.get(self.upstream) or {}) if self.upstream else {}
        return {**hosts[name], **(before.get(name) or {})}

    def _run(
        self,
        props: dict[str, Any],
        hosts: dict[str, Any],
        todo: list[str],
        olds: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        shared = {**props, **self.call_state(props, hosts, todo, olds or {})}

        async def one(ctx: HostContext, host: dict[str, Any]) -> dict[str, Any]:
            return {**host, **await self.apply_host(ctx, host, shared)}

        return self._gather(shared, hosts, todo, one, olds or {})

    def _gather(
        self,
        props: dict[str, Any],
        hosts: dict[str, Any],
        todo: list[str],
        fn: Callable[[HostContext, dict[str, Any]], Awaitable[dict[str, Any]]],
        olds: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not todo:
            return {}
        deadline = time.monotonic() + float(props.get("deadline_seconds") or 1800)

        untouched: set[str] = set()

        async def guarded(name: str) -> tuple[str, dict[str, Any] | None, str | None]:
            ctx = HostContext(name=name, step=self.step, deadline=deadline, old=(olds or {}).get(name))
            host = self.with_upstream(props, hosts, name)
            try:
                result = await asyncio.wait_for(fn(ctx, host), timeout=ctx.remaining() + 5)
                return name, result, None
            except TimeoutError:
                return name, None, f"not done within the step's deadline of {props.get('deadline_seconds')} s"
            except HostError as exc:
                if isinstance(exc, HostUntouched):
                    untouched.add(name)
                return name, None, str(exc)
            except Exception as exc:  # a bug or an unexpected failure: still name the host
                return name, None, f"{type(exc).__name__}: {exc}"

        async def all_hosts() -> list[tuple[str, dict[str, Any] | None, str | None]]:
            # Hetzner calls block a thread for a whole action wait: one thread per host (and a few for
            # file reads), or hosts beyond asyncio's default pool size would queue in waves.
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(len(todo) + 4))
            return await asyncio.gather(*(guarded(n) for n in todo))

        outcome = asyncio.run(all_hosts())
        failures = {name: err for name, _, err in outcome if err is not None}
        if failures:
            for name, err in sorted(failures.items()):
                pulumi.log.error(f"[{name}] {self.step}: {err}")
            raise StepError(self.step, failures, len(todo), frozenset(untouched))
        return {name: result for name, result, _ in outcome if result is not None}
