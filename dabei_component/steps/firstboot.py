"""Step 4, first boot: prove each installed host converged on its flake, or apply a new flake revision.

The component connects with strict host-key checking against the key it generated for the host (it was in
the seed), sends the host its flake's locked source (`nix-dabei receive`; the host builds exactly that),
checks that the host booted since the rescue session (boot id), and polls `nix-dabei status` until the
first-boot program reports `converged`, or fails with the status and the journal tail. Converged, the host
must run the system its flake evaluated to on the deployer (`system`), else the step fails naming both. A
new system or flake for an installed host is applied in place with `nix-dabei apply`: the disk is not
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shlex
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncssh
import pulumi

from ..ssh import HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, secret_options
from .install import host_flake
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


def source_archive(path: str) -> bytes:
    """A flake source (a store path on the deployer) as an uncompressed tar of its contents."""
    if not Path(path).is_dir():
        raise HostError(f"the flake source {path} is not in this machine's Nix store any more: run `up` again")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in sorted(Path(path).iterdir()):
            archive.add(entry, arcname=entry.name)
    return buffer.getvalue()


class FirstBootProvider(FleetStep):
    step = "firstboot"
    # What the program decides: a (re)installed server or a new flake. What the install step recorded
    # (installed image, rescue boot id) is read, not compared: a preview does not know it yet.
    # `system`: the store path the host's flake evaluates to (the hosts a commit changes, and only those);
    # `source`: the flake source's hash, given instead when evaluation is off.
    host_fields = ("server_id", "reinstall", "flake", "system", "source")
    upstream = "installed"

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """A host (re)installed by the install step, a new flake, system or (evaluation off) source, or drift
        that a refresh recorded."""
        if wants_install(old, new):
            return True
        assert old is not None
        if old.get("drift") or any(old.get(f) != new.get(f) for f in ("flake", "source")):
            return True
        # The recorded system is what the host ran at convergence; no expected one: evaluation is off.
        return new.get("system") is not None and old.get("system") != new.get("system")

    secret_inputs = ("deploy_private_key",)

    async def _connect(
        self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str, deadline: float
    ) -> asyncssh.SSHClientConnection:
        assert self.settings is not None
        try:
            conn, _ = await connect(
                host["ipv4"],
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
                    await self._apply(ctx, conn, host["host_ref"])
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

    async def _send_source(
        self, ctx: HostContext, conn: asyncssh.SSHClientConnection, source: Mapping[str, Any]
    ) -> None:
        """`nix-dabei receive`: the locked source into the host's flakes directory (kept if already there)."""
        source_id = str(source["host_ref"]).split("/")[-1].split("?")[0]
        archive = await asyncio.to_thread(source_archive, str(source["path"]))
        done = await run(
            conn,
            f"nix-dabei receive --source {shlex.quote(source_id)}",
            input=archive,
            timeout=max(1.0, ctx.remaining()),
            check=False,
        )
        if done.exit_status != 0:
            raise HostError(f"sending the flake source {source['url']} failed: {done.stderr.strip()[-500:]}")
        ctx.log(f"flake source {source['url']} sent ({len(archive)} bytes)")

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        deploy_key = props["deploy_private_key"]
        old = ctx.old
        sources = props.get("sources") or {}
        host = {**host, "host_ref": host_flake(host, sources)}
        in_place = (
            old is not None
            and old.get("system")
            and all(old.get(f) == host.get(f) for f in ("server_id", "installed_image", "rescue_boot_id"))
        )
        source = sources.get(host["flake"])
        if source or in_place:
            conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
            with contextlib.closing(conn):
                if source:
                    await self._send_source(ctx, conn, source)
                if in_place:
                    ctx.log(f"applying flake {host['flake']} in place")
                    await self._apply(ctx, conn, host["host_ref"])
        status = await self._wait_converged(ctx, host, deploy_key)
        st = status["status"]
        if st.get("flake") and st["flake"] != host["host_ref"]:
            raise HostError(f"the host converged on flake {st['flake']!r}, not {host['host_ref']!r}")
        expected, running = host.get("system"), status.get("system")
        if expected and running != expected:
            raise HostError(
                f"the host runs {running}, not {expected} that its flake {host['flake']} evaluates to on the deployer"
            )
        ctx.log(f"converged on {running}")
        return {
            "system": running,
            "host_ref": host["host_ref"],
            "source_url": source["url"] if source else None,
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
        elif st.get("flake") != host.get("host_ref", host.get("flake")):
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
        sources: pulumi.Input[dict[str, Any]],
        deploy_private_key: pulumi.Input[str],
        deadline_seconds: pulumi.Input[float],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "installed": installed,
            "sources": sources,
            "deploy_private_key": deploy_private_key,
            "deadline_seconds": deadline_seconds,
        }
        super().__init__(FirstBootProvider(), name, props, secret_options(FirstBootProvider, opts))
