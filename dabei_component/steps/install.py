"""Step 3, install: write the image and the host's seed onto its disk from rescue, then boot from disk.

The pinned rescue session from the rescue step is reused when it is still there. When its host key no
longer matches, the API decides what that means: if the server was restarted since the session began (a
re-run after a failure, a reinstall), the session is over and the step enters rescue again itself; if not,
the key changed within the session and the host is refused. A host that already answers as installed,
with the host key the component generated for it, is not written again.

A write that fails on the way (the connection dropped, the stream damaged) is retried: first over a new
connection to the same rescue session, then once more in a fresh rescue session. A refused disk (not a
block device, in use, too small) is never retried.
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
from ..disk_writer import DiskRefused, DiskWriteError, WriteReport, write_image
from ..hetzner import HetznerError
from ..keys import fingerprint
from ..ssh import HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, as_int, host_address, is_unknown, secret_options
from .image import ensure_prepared
from .rescue import RescueSession, enter_rescue, hetzner_api, verify_rescue, wants_install

SECRET_INPUTS = ("deploy_private_key", "host_private_keys")
_PROBE_SECONDS = 15.0
# Attempts at writing one host: the pinned session, a new connection to it, a fresh rescue session.
WRITE_ATTEMPTS = 3


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


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

    async def _write(
        self, ctx: HostContext, session: RescueSession, host: Mapping[str, Any], image: Any, seed: bytes
    ) -> WriteReport:
        ctx.log(f"writing the image to {host.get('disk') or '/dev/sda'} ({_size(image.compressed_size)} compressed)")
        try:
            return await write_image(
                session.conn,
                image,
                disk=host.get("disk") or "/dev/sda",
                seed=seed,
                progress=lambda p: ctx.log(
                    f"{_size(p.bytes_sent)} of {_size(p.total_bytes)} compressed sent, {_size(p.rate)}/s"
                ),
            )
        finally:
            session.conn.close()

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
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
                report = await self._write(ctx, session, host, prepared, seed)
                break
            except DiskRefused as exc:
                raise HostError(str(exc)) from None
            except DiskWriteError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise HostError(f"{exc} (gave up after {attempt} attempts)") from None
                again = "over a new connection" if attempt + 1 < WRITE_ATTEMPTS else "in a fresh rescue session"
                ctx.log(f"write attempt {attempt} failed: {exc}; retrying {again}")
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
