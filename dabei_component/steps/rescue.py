"""Step 2, rescue: boot each server into Hetzner's rescue system and pin its host key.

Rescue host keys are new on every rescue boot, so the first key seen after the reset is pinned (trust on
first use) and every later connection of the session must present exactly that key. Before anything is
written, the host must prove it is a rescue system: hostname `rescue` and the target disk a block device.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Mapping
from typing import Any

import asyncssh
import pulumi
from pulumi.dynamic import CheckFailure

from ..hetzner import HetznerApi, HetznerError
from ..ssh import SshError, connect, run
from .base import FleetStep, HostContext, HostError, as_int, secret_options

# Enough for a script to tell a rescue system from anything else, in one round trip.
_PROBE = "hostname; cat /proc/sys/kernel/random/boot_id; test -b {disk} && echo block || echo missing"
INSTALL_POLICIES = ("on-image-change", "never")


async def verify_rescue(conn: asyncssh.SSHClientConnection, disk: str) -> str:
    """Refuse unless the host is a rescue system with `disk` present; return its boot id."""
    probe = await run(conn, _PROBE.format(disk=shlex.quote(disk)), timeout=30)
    lines = probe.stdout.split()
    if len(lines) != 3:
        raise HostError(f"rescue check: unexpected answer {probe.stdout!r}")
    hostname, boot_id, disk_state = lines
    if hostname != "rescue":
        raise HostError(f"refusing to write: the host is not a rescue system (hostname {hostname!r})")
    if disk_state != "block":
        raise HostError(f"refusing to write: {disk} is not a block device on the rescue system")
    return boot_id


def hetzner_api(provider: FleetStep) -> HetznerApi:
    settings = provider.settings
    if settings is None:
        raise HostError("the provider was not configured")
    return HetznerApi(settings.require_token(), settings.endpoint)


async def enter_rescue(
    ctx: HostContext, provider: FleetStep, host: Mapping[str, Any], props: Mapping[str, Any]
) -> tuple[asyncssh.SSHClientConnection, str, str]:
    """Enable rescue, reset, connect (pinning the new key) and verify. Returns (conn, host key, boot id)."""
    api = hetzner_api(provider)
    server_id = as_int(host["server_id"])
    key_ids = [as_int(k) for k in props["rescue_ssh_key_ids"]]
    try:
        ctx.log("enabling rescue and resetting")
        await asyncio.to_thread(api.enable_rescue, server_id, key_ids, ctx.deadline)
        server = await asyncio.to_thread(api.server, server_id, ctx.deadline)
        if server.status == "off":
            await asyncio.to_thread(api.power_on, server_id, ctx.deadline)
        else:
            await asyncio.to_thread(api.reset, server_id, ctx.deadline)
    except HetznerError as exc:
        raise HostError(str(exc)) from None
    settings = provider.settings
    assert settings is not None
    try:
        conn, host_key = await connect(
            host["ipv4"],
            port=settings.ssh_port,
            client_key=props["deploy_private_key"],
            host_key=None,
            deadline=ctx.deadline,
            log=ctx.log,
        )
    except SshError as exc:
        raise HostError(str(exc)) from None
    try:
        boot_id = await verify_rescue(conn, host.get("disk") or "/dev/sda")
    except BaseException:
        conn.close()
        raise
    return conn, host_key, boot_id


def check_hosts(news: Mapping[str, Any]) -> list[CheckFailure]:
    failures = []
    for name, host in (news.get("hosts") or {}).items():
        policy = host.get("reinstall", "on-image-change")
        if policy not in INSTALL_POLICIES:
            failures.append(
                CheckFailure(
                    f"hosts.{name}.reinstall",
                    f"expected one of {', '.join(INSTALL_POLICIES)}, got {policy!r}",
                )
            )
    return failures


def wants_install(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """A host is (re)installed when it is new, its server was replaced, or its image changed and its
    reinstall policy allows it. A new image under policy `never` shows in the preview, nothing more."""
    if old is None or old.get("server_id") != new.get("server_id"):
        return True
    return old.get("image") != new.get("image") and new.get("reinstall", "on-image-change") != "never"


class RescueProvider(FleetStep):
    step = "rescue"
    host_fields = ("server_id", "image")
    secret_inputs = ("deploy_private_key",)

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        return check_hosts(news)

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        return wants_install(old, new)

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        conn, host_key, boot_id = await enter_rescue(ctx, self, host, props)
        conn.close()
        ctx.log("rescue system up, host key pinned")
        return {"rescue_host_key": host_key, "rescue_boot_id": boot_id}


class Rescue(pulumi.dynamic.Resource):
    hosts: pulumi.Output[dict[str, Any]]

    def __init__(
        self,
        name: str,
        hosts: pulumi.Input[dict[str, Any]],
        rescue_ssh_key_ids: pulumi.Input[list[Any]],
        deploy_private_key: pulumi.Input[str],
        deadline_seconds: pulumi.Input[float],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "rescue_ssh_key_ids": rescue_ssh_key_ids,
            "deploy_private_key": deploy_private_key,
            "deadline_seconds": deadline_seconds,
        }
        super().__init__(RescueProvider(), name, props, secret_options(RescueProvider, opts))
