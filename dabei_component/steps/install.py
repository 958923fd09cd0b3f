"""Step 3, install: write the image and the host's seed onto its disk from rescue, then boot from disk.

The pinned rescue session from the rescue step is reused when it is still there. When its host key no
longer matches, the API decides what that means: if the server was restarted since the session began (a
re-run after a failure, a reinstall), the session is over and the step enters rescue again itself; if not,
the key changed within the session and the host is refused. A host that already answers as installed,
with the host key the component generated for it, is not written again.

The hosts of one call that are ready in rescue are written together (`relay.py`): the deployer sends the
image once, to one of them, and the hosts pass it on among themselves, each writing and verifying its own
disk. A host whose relayed write fails is written directly. A write that fails on the way (the connection
dropped, the stream damaged) is retried: first over a new connection to the same rescue session, then
once more in a fresh rescue session. A refused disk (not a block device, in use, too small) is never
retried. All streams of a call share one byte budget for their send buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import pulumi
from dabei_firstboot.seed import encode_seed
from pulumi.dynamic import CheckFailure

from .. import validation
from ..disk_writer import (
    ByteBudget,
    DiskRefused,
    DiskWriteError,
    ProgressCallback,
    WriteProgress,
    WriteReport,
    human_size,
    write_image,
)
from ..hetzner import HetznerError
from ..imaging import PreparedImage
from ..keys import fingerprint
from ..relay import RelayHost, relay_write
from ..ssh import HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, as_int, host_address, is_unknown, secret_options
from .image import ensure_prepared
from .rescue import RescueSession, enter_rescue, hetzner_api, verify_rescue, wants_install

SECRET_INPUTS = ("deploy_private_key", "host_private_keys")
_PROBE_SECONDS = 15.0
# Attempts at writing one host: the pinned session, a new connection to it, a fresh rescue session.
WRITE_ATTEMPTS = 3
# The relay starts once every host of the call is ready or out, or this long after the first was ready;
# hosts ready later are written directly.
RELAY_GATHER_SECONDS = 120.0


class FleetWrite:
    """The hosts of one install call that write together: a relay round and a shared byte budget."""

    def __init__(self, names: list[str]) -> None:
        self.expected = set(names)
        self.budget = ByteBudget()
        self._joined: dict[str, tuple[HostContext, RelayHost]] = {}
        self._left: set[str] = set()
        self._results: dict[str, asyncio.Future[WriteReport | DiskWriteError]] = {}
        self._ready: asyncio.Event | None = None
        self._round: asyncio.Task[None] | None = None
        self._image: PreparedImage | None = None

    def leave(self, name: str) -> None:
        """The host will not join (done, failed, or already written): do not wait for it."""
        if name not in self._joined:
            self._left.add(name)
            self._check_ready()

    def _check_ready(self) -> None:
        if self._ready is not None and set(self._joined) | self._left >= self.expected:
            self._ready.set()

    async def write(self, ctx: HostContext, host: RelayHost, image: PreparedImage) -> WriteReport | None:
        """Join the relay round; None when the round had started already (write directly)."""
        if self._ready is not None and self._ready.is_set():
            return None  # the round has started
        future: asyncio.Future[WriteReport | DiskWriteError] = asyncio.get_running_loop().create_future()
        self._results[ctx.name] = future
        self._joined[ctx.name] = (ctx, host)
        self._image = image
        if self._ready is None:
            self._ready = asyncio.Event()
            self._round = asyncio.create_task(self._run_round())
        self._check_ready()
        result = await future
        if isinstance(result, DiskWriteError):
            raise result
        return result

    async def _run_round(self) -> None:
        assert self._ready is not None and self._image is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), RELAY_GATHER_SECONDS)
        self._ready.set()  # later joiners write directly
        joined = dict(self._joined)
        contexts = {name: ctx for name, (ctx, _) in joined.items()}
        try:
            outcome = await relay_write(
                [host for _, host in sorted(joined.values(), key=lambda j: j[0].name)],
                self._image,
                log=lambda name, message: contexts[name].log(message),
                budget=self.budget,
                progress=_progress_log(contexts[min(contexts)]) if contexts else None,
            )
        except Exception as exc:  # a bug or an unexpected failure: every host falls back to its own write
            outcome = {name: DiskWriteError(f"relay failed: {type(exc).__name__}: {exc}") for name in joined}
        for name, future in self._results.items():
            if not future.done():
                future.set_result(outcome.get(name, DiskWriteError("the relay did not report this host")))


# Where `call_state` hands the relay groups ({Nix system: FleetWrite}) to `apply_host`.
_RELAYS = "__relays"


def _system(host: Mapping[str, Any]) -> str:
    return str(host.get("platform") or "x86_64-linux")


def _progress_log(ctx: HostContext) -> ProgressCallback:
    def report(p: WriteProgress) -> None:
        sent, total, rate = human_size(p.bytes_sent), human_size(p.total_bytes), human_size(p.rate)
        ctx.log(f"{sent} of {total} compressed sent, {rate}/s")

    return report


def host_flake(host: Mapping[str, Any], sources: Mapping[str, Any] | None) -> str:
    """The flake reference the host builds: its locked source as sent by the first-boot step (`sources`,
    by the flake's text in the config), else the flake as given (a stack recorded before sources)."""
    source = (sources or {}).get(host["flake"])
    return str(source["host_ref"]) if source else str(host["flake"])


def seed_document(
    host: Mapping[str, Any], private_key: str, sources: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "flake": host_flake(host, sources),
        "hostname": host["hostname"],
        "host_key": {"type": "ssh-ed25519", "private": private_key, "public": host["host_public_key"]},
        "authorized_keys": list(host["authorized_keys"]),
    }


class InstallProvider(FleetStep):
    step = "install"
    host_fields = ("server_id", "reinstall")
    upstream = "rescued"
    secret_inputs = SECRET_INPUTS

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        keys, hosts = news.get("host_private_keys"), news["hosts"]
        if is_unknown(keys) or is_unknown(hosts):
            return []
        if not isinstance(keys, Mapping):
            return [CheckFailure("host_private_keys", "expected a map of host name to private host key")]
        problems = []
        for name in hosts:
            if name not in keys:
                problems.append((f"host_private_keys.{name}", "required: the host key written into the seed"))
            elif not is_unknown(keys[name]):
                problems += validation.private_key(f"host_private_keys.{name}", keys[name])
        return [CheckFailure(prop, reason) for prop, reason in problems]

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        return wants_install(old, new)

    async def _installed(self, ctx: HostContext, host: Mapping[str, Any], props: Mapping[str, Any]) -> bool:
        """Whether the host already runs a system installed from its seed (a re-run after a failure)."""
        assert self.settings is not None
        try:
            conn, _ = await connect(
                host_address(host),
                port=self.settings.ssh_port,
                client_key=props["deploy_private_key"],
                host_key=host["host_public_key"],
                deadline=asyncio.get_running_loop().time() + min(_PROBE_SECONDS, ctx.remaining()),
            )
        except SshError:
            return False
        with contextlib.closing(conn):
            probe = await run(conn, "nix-dabei status", timeout=30, check=False)
        return probe.exit_status == 0

    async def _pinned_session(
        self, ctx: HostContext, host: Mapping[str, Any], props: Mapping[str, Any], pin: tuple[str, int]
    ) -> RescueSession | None:
        """A new connection to the pinned rescue session (host key, ID of the action that started it);
        None when the server has left it."""
        assert self.settings is not None
        host_key, action_id = pin
        try:
            conn, _ = await connect(
                host_address(host),
                port=self.settings.ssh_port,
                client_key=props["deploy_private_key"],
                host_key=host_key,
                deadline=asyncio.get_running_loop().time() + min(_PROBE_SECONDS, ctx.remaining()),
            )
        except HostKeyMismatch as exc:
            api = hetzner_api(self, ctx)
            try:
                restarted = await asyncio.to_thread(
                    api.restarted_since, as_int(host["server_id"]), action_id, ctx.deadline
                )
            except HetznerError as err:
                raise HostError(f"{exc}; cannot tell whether the rescue session ended: {err}") from None
            if not restarted:
                raise HostError(
                    f"refusing to write: the rescue system changed its host key within one session "
                    f"(pinned {fingerprint(host_key)}, the server was not restarted since): {exc}"
                ) from None
            ctx.log("the server was restarted since the pinned rescue session; entering rescue again")
            return None
        except SshError:
            ctx.log("the pinned rescue session does not answer; entering rescue again")
            return None
        try:
            boot_id = await verify_rescue(conn, host.get("disk") or "/dev/sda")
        except BaseException:
            conn.close()
            raise
        return RescueSession(conn, host_key, boot_id, action_id)

    def call_state(
        self, props: Mapping[str, Any], hosts: Mapping[str, Any], todo: list[str], olds: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One relay group per Nix system: hosts relay the image only to hosts of their own system."""
        by_system: dict[str, list[str]] = {}
        for name in todo:
            by_system.setdefault(_system(hosts[name]), []).append(name)
        return {_RELAYS: {system: FleetWrite(names) for system, names in by_system.items()}}

    async def _write(
        self,
        ctx: HostContext,
        session: RescueSession,
        host: Mapping[str, Any],
        image: PreparedImage,
        seed: bytes,
        fleet: FleetWrite | None,
        relayed: bool,
    ) -> WriteReport:
        """One write of the image: through the relay (`relayed`, the first attempt), else directly, within
        the byte budget the fleet's writes share."""
        disk = host.get("disk") or "/dev/sda"
        relay = fleet if relayed else None
        try:
            if relay is not None and not host.get("ipv4"):
                # The relay runs between the hosts' IPv4 addresses; an IPv6-only host is written directly.
                relay.leave(ctx.name)
                ctx.log("IPv6-only host: not in the relay")
            elif relay is not None:
                assert self.settings is not None
                member = RelayHost(
                    ctx.name, session.conn, host["ipv4"], self.settings.ssh_port, session.host_key, disk, seed
                )
                result = await relay.write(ctx, member, image)
                if result is not None:
                    return result
            ctx.log(f"writing the image to {disk} ({human_size(image.compressed_size)} compressed), streamed directly")
            return await write_image(
                session.conn,
                image,
                disk=disk,
                seed=seed,
                progress=_progress_log(ctx),
                budget=fleet.budget if fleet is not None else None,
            )
        finally:
            session.conn.close()

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        fleet = (props.get(_RELAYS) or {}).get(_system(host))
        try:
            return await self._install(ctx, host, props, fleet)
        finally:
            if fleet is not None:
                fleet.leave(ctx.name)

    async def _install(
        self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any], fleet: FleetWrite | None
    ) -> dict[str, Any]:
        # The image of the host's Nix system (a stack recorded before images per system has one image).
        images = props.get("images") or {"x86_64-linux": props.get("image")}
        image = images.get(host.get("platform") or "x86_64-linux")
        if not image:
            raise HostError(f"no image for the host's system {host.get('platform')!r}")
        try:
            # An action left running by an earlier, interrupted run (a reset into the written disk) decides
            # what the server runs: look at the host only once it has ended.
            await asyncio.to_thread(hetzner_api(self, ctx).wait_unlocked, as_int(host["server_id"]), ctx.deadline)
        except HetznerError as exc:
            raise HostError(str(exc)) from None
        if ctx.old is None and await self._installed(ctx, host, props):
            ctx.log("already installed (the host answers with its generated key); not writing again")
            return {"installed_image": host["image"]}
        prepared = await asyncio.to_thread(ensure_prepared, image)
        seed_doc = seed_document(host, props["host_private_keys"][ctx.name], props.get("sources"))
        seed = encode_seed(seed_doc, as_int(image["seed_size"]))
        pin: tuple[str, int] | None = None
        if host.get("rescue_host_key") and host.get("rescue_action_id") is not None:
            pin = (host["rescue_host_key"], as_int(host["rescue_action_id"]))
        report: WriteReport | None = None
        session: RescueSession | None = None
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            session = None
            if pin is not None and attempt < WRITE_ATTEMPTS:
                session = await self._pinned_session(ctx, host, props, pin)
            if session is None:
                session = await enter_rescue(ctx, self, host, props)
            pin = (session.host_key, session.action_id)
            try:
                report = await self._write(ctx, session, host, prepared, seed, fleet, relayed=attempt == 1)
                break
            except DiskRefused as exc:
                raise HostError(str(exc)) from None
            except DiskWriteError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise HostError(f"{exc} (gave up after {attempt} attempts)") from None
                again = "over a new connection" if attempt + 1 < WRITE_ATTEMPTS else "in a fresh rescue session"
                ctx.log(f"write attempt {attempt} failed: {exc}; retrying {again}, streamed directly")
        assert report is not None and session is not None
        ctx.log("image verified on disk; booting the installed system")
        try:
            await asyncio.to_thread(hetzner_api(self, ctx).reset, as_int(host["server_id"]), ctx.deadline)
        except HetznerError as exc:
            raise HostError(str(exc)) from None
        return {
            "installed_image": host["image"],
            "rescue_boot_id": session.boot_id,
            "bytes_sent": report.bytes_sent,
            "write_seconds": round(report.seconds, 3),
        }


class Install(pulumi.dynamic.Resource):
    hosts: pulumi.Output[dict[str, Any]]

    def __init__(
        self,
        name: str,
        hosts: pulumi.Input[dict[str, Any]],
        rescued: pulumi.Input[dict[str, Any]],
        images: pulumi.Input[Mapping[str, pulumi.Input[dict[str, Any]]]],
        sources: pulumi.Input[dict[str, Any]],
        rescue_ssh_key_ids: pulumi.Input[list[Any]],
        deploy_private_key: pulumi.Input[str],
        host_private_keys: pulumi.Input[Mapping[str, pulumi.Input[str]]],
        deadline_seconds: pulumi.Input[float],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "rescued": rescued,
            "images": images,
            "sources": sources,
            "rescue_ssh_key_ids": rescue_ssh_key_ids,
            "deploy_private_key": deploy_private_key,
            "host_private_keys": host_private_keys,
            "deadline_seconds": deadline_seconds,
        }
        super().__init__(InstallProvider(), name, props, secret_options(InstallProvider, opts))
