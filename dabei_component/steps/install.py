"""Step 3, install: write the image and the host's seed onto its disk from rescue, then boot from disk.

The pinned rescue session from the rescue step is reused when it is still there; when the server has left
rescue since (a re-run after a failure, a reinstall), the step enters rescue again itself. A host that
already answers as installed, with the host key the component generated for it, is not written again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import asyncssh
import pulumi
from dabei_firstboot.seed import encode_seed
from pulumi.dynamic import CheckFailure

from ..disk_writer import DiskWriteError, write_image
from ..hetzner import HetznerError
from ..ssh import HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, as_int, secret_options
from .image import ensure_prepared
from .rescue import check_hosts, enter_rescue, hetzner_api, verify_rescue, wants_install

SECRET_INPUTS = ("deploy_private_key", "host_private_keys")
_PROBE_SECONDS = 15.0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def seed_document(host: Mapping[str, Any], private_key: str) -> dict[str, Any]:
    return {
        "flake": host["flake"],
        "hostname": host["hostname"],
        "host_key": {"type": "ssh-ed25519", "private": private_key, "public": host["host_public_key"]},
        "authorized_keys": list(host["authorized_keys"]),
    }


class InstallProvider(FleetStep):
    step = "install"
    host_fields = ("server_id", "image")
    secret_inputs = SECRET_INPUTS

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        return check_hosts(news)

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        return wants_install(old, new)

    async def _installed(self, ctx: HostContext, host: Mapping[str, Any], props: Mapping[str, Any]) -> bool:
        """Whether the host already runs a system installed from its seed (a re-run after a failure)."""
        assert self.settings is not None
        try:
            conn, _ = await connect(
                host["ipv4"],
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

    async def _rescue_session(
        self, ctx: HostContext, host: Mapping[str, Any], props: Mapping[str, Any]
    ) -> tuple[asyncssh.SSHClientConnection, str]:
        """The pinned rescue session if the server is still in it, else a new one. Returns (conn, boot id)."""
        assert self.settings is not None
        pinned = host.get("rescue_host_key")
        if pinned:
            try:
                conn, _ = await connect(
                    host["ipv4"],
                    port=self.settings.ssh_port,
                    client_key=props["deploy_private_key"],
                    host_key=pinned,
                    deadline=asyncio.get_running_loop().time() + min(_PROBE_SECONDS, ctx.remaining()),
                )
                return conn, await verify_rescue(conn, host.get("disk") or "/dev/sda")
            except (HostKeyMismatch, SshError):
                ctx.log("the pinned rescue session is gone; entering rescue again")
        conn, _, boot_id = await enter_rescue(ctx, self, host, props)
        return conn, boot_id

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        image = props["image"]
        if ctx.old is None and await self._installed(ctx, host, props):
            ctx.log("already installed (the host answers with its generated key); not writing again")
            return {"installed_image": host["image"]}
        prepared = await asyncio.to_thread(ensure_prepared, image)
        seed = encode_seed(seed_document(host, props["host_private_keys"][ctx.name]), as_int(image["seed_size"]))
        conn, boot_id = await self._rescue_session(ctx, host, props)
        try:
            report = await write_image(
                conn,
                prepared,
                disk=host.get("disk") or "/dev/sda",
                seed=seed,
                progress=lambda p: ctx.log(
                    f"{_size(p.bytes_sent)} of {_size(p.total_bytes)} compressed sent, {_size(p.rate)}/s"
                ),
            )
        except DiskWriteError as exc:
            raise HostError(str(exc)) from None
        finally:
            conn.close()
        ctx.log("image verified on disk; booting the installed system")
        try:
            await asyncio.to_thread(hetzner_api(self).reset, as_int(host["server_id"]), ctx.deadline)
        except HetznerError as exc:
            raise HostError(str(exc)) from None
        return {
            "installed_image": host["image"],
            "rescue_boot_id": boot_id,
            "bytes_sent": report.bytes_sent,
            "write_seconds": round(report.seconds, 3),
        }


class Install(pulumi.dynamic.Resource):
    hosts: pulumi.Output[dict[str, Any]]

    def __init__(
        self,
        name: str,
        hosts: pulumi.Input[dict[str, Any]],
        image: pulumi.Input[dict[str, Any]],
        rescue_ssh_key_ids: pulumi.Input[list[Any]],
        deploy_private_key: pulumi.Input[str],
        host_private_keys: pulumi.Input[dict[str, str]],
        deadline_seconds: pulumi.Input[float],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "image": image,
            "rescue_ssh_key_ids": rescue_ssh_key_ids,
            "deploy_private_key": deploy_private_key,
            "host_private_keys": host_private_keys,
            "deadline_seconds": deadline_seconds,
        }
        super().__init__(InstallProvider(), name, props, secret_options(InstallProvider, opts))
