"""Step 2, rescue: boot each server into Hetzner's rescue system and pin its host key.

Rescue host keys are new on every rescue boot, so the first key seen after the reset is pinned (trust on
first use) and every later connection of the session must present exactly that key. Before anything is
written, the host must prove it is a rescue system: hostname `rescue` and the target disk a block device.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncssh
import pulumi
from pulumi.dynamic import CheckFailure

from ..hetzner import SYSTEMS, HetznerApi, HetznerError, ServerInfo
from ..ssh import SshError, connect, run
from .base import FleetStep, HostContext, HostError, as_int, host_address, is_unknown, secret_options

# Enough for a script to tell a rescue system from anything else, in one round trip.
_PROBE = "hostname; cat /proc/sys/kernel/random/boot_id; test -b {disk} && echo block || echo missing"


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


def hetzner_api(provider: FleetStep, ctx: HostContext) -> HetznerApi:
    settings = provider.settings
    if settings is None:
        raise HostError("the provider was not configured")
    return HetznerApi(settings.require_token(), settings.endpoint, log=ctx.log)


@dataclass(frozen=True)
class RescueSession:
    """A rescue boot of one server: the connection, the pinned key, the boot id, and the action that
    started it (any later restart of the server ends the session)."""

    conn: asyncssh.SSHClientConnection
    host_key: str
    boot_id: str
    action_id: int


def refuse_other_architecture(server: ServerInfo, host: Mapping[str, Any]) -> None:
    """Raise HostError when the server's architecture (the API's server type) is not the one the host's
    image was chosen for (`platform`): its firmware would not boot it. Checked before rescue, so nothing is
    written; the preview refuses the same for every server whose type it can read."""
    system = SYSTEMS.get(server.architecture)
    wanted = host.get("platform")
    if system and wanted and system != wanted:
        raise HostError(
            f"server {server.id} is a {server.server_type} ({server.architecture}, {system}), but its image is "
            f"for {wanted}: refused before anything is written (an existing server given as a resource gets "
            f"the x86_64 image; give an arm server by its ID)"
        )


async def enter_rescue(
    ctx: HostContext, provider: FleetStep, host: Mapping[str, Any], props: Mapping[str, Any]
) -> RescueSession:
    """Enable rescue, reset, connect (pinning the new key) and verify."""
    api = hetzner_api(provider, ctx)
    server_id = as_int(host["server_id"])
    key_ids = [as_int(k) for k in props["rescue_ssh_key_ids"]]
    try:
        server = await asyncio.to_thread(api.server, server_id, ctx.deadline)
        refuse_other_architecture(server, host)
        ctx.log("enabling rescue and resetting")
        await asyncio.to_thread(api.enable_rescue, server_id, key_ids, ctx.deadline)
        if server.status == "off":
            action_id = await asyncio.to_thread(api.power_on, server_id, ctx.deadline)
        else:
            action_id = await asyncio.to_thread(api.reset, server_id, ctx.deadline)
    except HetznerError as exc:
        raise HostError(str(exc)) from None
    settings = provider.settings
    assert settings is not None
    try:
        conn, host_key = await connect(
            host_address(host),
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
    return RescueSession(conn, host_key, boot_id, action_id)


# Server types (with the locations offering each) and location names of each API endpoint, read once per
# provider process.
_CATALOGS: dict[str | None, tuple[dict[str, set[str]], set[str]]] = {}
_CATALOG_SECONDS = 10.0


def check_catalog(provider: FleetStep, hosts: Any) -> list[CheckFailure]:
    """Unknown server types and locations, and a type the location does not offer (CAX outside the EU, for
    one), checked against the project's catalog when a token is set.

    Without a token, or when the API cannot be reached, nothing is (pulumi-hcloud then names the bad value
    when it creates the server)."""
    settings = provider.settings
    wanted = {
        name: host
        for name, host in (hosts.items() if isinstance(hosts, Mapping) else [])
        if isinstance(host, Mapping)
        and any(isinstance(host.get(f), str) and not is_unknown(host[f]) for f in ("server_type", "location"))
    }
    if not wanted or settings is None or not settings.token:
        return []
    if settings.endpoint not in _CATALOGS:
        api = HetznerApi(settings.token, settings.endpoint)
        try:
            _CATALOGS[settings.endpoint] = api.catalog(time.monotonic() + _CATALOG_SECONDS)
        except HetznerError as exc:
            pulumi.log.warn(f"server types and locations not checked: {exc}")
            return []
    server_types, locations = _CATALOGS[settings.endpoint]
    failures = []
    for name, host in wanted.items():
        server_type, location = host.get("server_type"), host.get("location")
        known_type = isinstance(server_type, str) and server_type in server_types
        known_location = isinstance(location, str) and location in locations
        if isinstance(server_type, str) and not is_unknown(server_type) and not known_type:
            offers = ", ".join(sorted(server_types))
            failures.append(
                CheckFailure(
                    f"hosts.{name}.server_type", f"unknown server type {server_type!r}; this project offers {offers}"
                )
            )
        if isinstance(location, str) and not is_unknown(location) and not known_location:
            offers = ", ".join(sorted(locations))
            failures.append(
                CheckFailure(f"hosts.{name}.location", f"unknown location {location!r}; this project offers {offers}")
            )
        if known_type and known_location and location not in server_types[str(server_type)]:
            where = ", ".join(sorted(server_types[str(server_type)])) or "no location"
            failures.append(
                CheckFailure(
                    f"hosts.{name}.location",
                    f"server type {server_type!r} is not offered in {location!r} (Hetzner answers "
                    f"'unsupported location for server type'); it is offered in {where}",
                )
            )
    return failures


def wants_install(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """A host is installed when it is new or its server was replaced, and reinstalled (its disk wiped)
    only on an explicit request: a `reinstall` ID it has never been given before (see
    `base.reinstall_requests`). A new
    image is not a request: it applies to hosts installed from then on, so a routine image bump (a
    `nix flake update`) never destroys data."""
    if old is None or old.get("server_id") != new.get("server_id"):
        return True
    request = new.get("reinstall")
    return bool(request) and request != old.get("reinstall") and request not in (old.get("reinstalls") or [])


class RescueProvider(FleetStep):
    step = "rescue"
    host_fields = ("server_id", "reinstall")
    secret_inputs = ("deploy_private_key",)

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        return check_catalog(self, news.get("hosts"))

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        return wants_install(old, new)

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        session = await enter_rescue(ctx, self, host, props)
        session.conn.close()
        ctx.log("rescue system up, host key pinned")
        return {
            "rescue_host_key": session.host_key,
            "rescue_boot_id": session.boot_id,
            "rescue_action_id": session.action_id,
        }


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
