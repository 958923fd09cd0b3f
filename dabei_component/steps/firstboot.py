"""Step 4, first boot: prove each installed host converged on its flake, or apply a new flake revision.

The component connects with strict host-key checking against the key it generated for the host (it was in
the seed), checks that the host booted since the rescue session (boot id), and polls `nix-dabei status`
until the first-boot program reports `converged`, or fails with the status and the journal tail. A new
flake revision for an installed host is applied in place with `nix-dabei apply`: the disk is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections.abc import Mapping
from typing import Any

import asyncssh
import pulumi

from ..ssh import HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, host_address, secret_options
from .rescue import wants_install

_POLL_SECONDS = 1.0
_READ_SECONDS = 20.0


def _failure(status: Mapping[str, Any]) -> str:
    st = status.get("status") or {}
    attempts = st.get("attempt")
    text = f"first boot failed in phase {st.get('phase')!r} after {attempts} attempt(s): {st.get('last_error')}"
    journal = (status.get("journal") or "").strip()
    if journal:
        tail = "\n".join("    " + line for line in journal.splitlines()[-30:])
        text += f"\n  journal tail:\n{tail}"
    return text


class FirstBootProvider(FleetStep):
    step = "firstboot"
    # What the program decides: a (re)installed server or a new flake. What the install step recorded
    # (installed image, rescue boot id) is read, not compared: a preview does not know it yet.
    host_fields = ("server_id", "reinstall", "flake")
    upstream = "installed"

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """A host (re)installed by the install step, a new flake, or drift that a refresh recorded."""
        if wants_install(old, new):
            return True
        assert old is not None
        return bool(old.get("drift")) or old.get("flake") != new.get("flake")

    secret_inputs = ("deploy_private_key",)

    async def _connect(
        self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str, deadline: float
    ) -> asyncssh.SSHClientConnection:
        assert self.settings is not None
        try:
            conn, _ = await connect(
                host_address(host),
                port=self.settings.ssh_port,
                client_key=deploy_key,
                host_key=host["host_public_key"],
                deadline=deadline,
                log=ctx.log,
            )
        except HostKeyMismatch as exc:
            raise HostError(f"refusing the host: {exc}") from None
        except SshError as exc:
            raise HostError(str(exc)) from None
        return conn

    async def _status(self, conn: asyncssh.SSHClientConnection) -> dict[str, Any]:
        done = await run(conn, "nix-dabei status", timeout=60)
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise HostError(f"`nix-dabei status` answered something that is not JSON: {done.stdout[:200]!r}") from None

    async def _apply(self, ctx: HostContext, conn: asyncssh.SSHClientConnection, flake: str) -> None:
        """`nix-dabei apply`: switch to `flake` and run the rebuild phase again; it ends converged or failed."""
        cmd = f"nix-dabei apply --flake {shlex.quote(flake)}"
        done = await run(conn, cmd, timeout=max(1.0, ctx.remaining()), check=False)
        if done.exit_status != 0:
            try:
                raise HostError(_failure(json.loads(done.stdout)))
            except ValueError:
                raise HostError(f"`nix-dabei apply` failed: {done.stderr.strip()[-500:]}") from None

    async def _wait_converged(self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str) -> dict[str, Any]:
        """Poll the host's status until it converged. A first boot that had already failed when the
        step began (the failure an earlier run reported, its cause fixed since) gets one more rebuild."""
        last_phase = None
        first_read = True
        conn: asyncssh.SSHClientConnection | None = None
        try:
            while True:
                if conn is None:
                    conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
                try:
                    status = await self._status(conn)
                except SshError:  # the connection dropped: the next round reconnects
                    conn.close()
                    conn = None
                    continue
                if host.get("rescue_boot_id") and status.get("boot_id") == host["rescue_boot_id"]:
                    raise HostError("the host still runs the boot it had in rescue: it never rebooted")
                st = status.get("status") or {}
                phase = st.get("phase")
                if phase != last_phase:
                    ctx.log(f"phase {phase} (attempt {st.get('attempt')})")
                    last_phase = phase
                if phase == "converged":
                    return status
                if phase == "failed" and first_read:
                    ctx.log(f"the first boot had failed ({st.get('last_error')}); running the rebuild again")
                    await self._apply(ctx, conn, host["flake"])
                elif phase == "failed":
                    raise HostError(_failure(status))
                elif ctx.remaining() < _POLL_SECONDS:
                    raise HostError(f"not converged before the deadline; last phase {phase!r}: {st.get('last_error')}")
                else:
                    await asyncio.sleep(_POLL_SECONDS)
                first_read = False
        finally:
            if conn is not None:
                conn.close()

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        deploy_key = props["deploy_private_key"]
        old = ctx.old
        in_place = (
            old is not None
            and old.get("system")
            and all(old.get(f) == host.get(f) for f in ("server_id", "installed_image", "rescue_boot_id"))
        )
        if in_place:
            ctx.log(f"applying flake {host['flake']} in place")
            conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
            with contextlib.closing(conn):
                await self._apply(ctx, conn, host["flake"])
        status = await self._wait_converged(ctx, host, deploy_key)
        st = status["status"]
        if st.get("flake") and st["flake"] != host["flake"]:
            raise HostError(f"the host converged on flake {st['flake']!r}, not {host['flake']!r}")
        ctx.log(f"converged on {status.get('system')}")
        return {
            "system": status.get("system"),
            "boot_id": status.get("boot_id"),
            "converged_at": st.get("finished_at"),
            "drift": None,
        }

    async def read_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        """What is really on the host now, so `pulumi refresh` shows drift: a host that does not answer with
        its generated key, is not converged, runs another flake, or runs another system than the one it
        converged to. `drift` says which; the next `up` acts on a host with drift (see `wants_action`)."""
        if not props.get("deploy_private_key"):
            return host
        loop = asyncio.get_running_loop()
        try:
            conn = await self._connect(ctx, host, props["deploy_private_key"], loop.time() + _READ_SECONDS)
        except HostError as exc:
            return {**host, "system": None, "drift": str(exc)}
        with contextlib.closing(conn):
            status = await self._status(conn)
        st = status.get("status") or {}
        system = status.get("system")
        drift = None
        if st.get("phase") != "converged":
            drift = f"first-boot phase is {st.get('phase')!r}"
        elif st.get("flake") != host.get("flake"):
            drift = f"the host runs flake {st.get('flake')!r}"
        elif host.get("system") and system != host["system"]:
            drift = f"the host runs {system}, not {host['system']} it converged to"
        return {**host, "system": system, "boot_id": status.get("boot_id"), "drift": drift}


class FirstBoot(pulumi.dynamic.Resource):
    hosts: pulumi.Output[dict[str, Any]]

    def __init__(
        self,
        name: str,
        hosts: pulumi.Input[dict[str, Any]],
        installed: pulumi.Input[dict[str, Any]],
        deploy_private_key: pulumi.Input[str],
        deadline_seconds: pulumi.Input[float],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "installed": installed,
            "deploy_private_key": deploy_private_key,
            "deadline_seconds": deadline_seconds,
        }
        super().__init__(FirstBootProvider(), name, props, secret_options(FirstBootProvider, opts))
