"""Step 4, first boot: prove each installed host converged on its flake, or apply a new flake revision.

The component connects with strict host-key checking against the key it generated for the host (it was in
the seed), sends the host its flake's locked source (`nix-dabei receive`; the host builds exactly that),
checks that the host booted since the rescue session (boot id), and polls `nix-dabei status` until the
first-boot program reports `converged`, or fails with the status and the journal tail. Converged, the host
must run the system its flake evaluated to on the deployer (`system`), else the step fails naming both. A
new system or flake for an installed host is applied in place with `nix-dabei apply`: the disk is not
touched.

In-place switches are safe (see `rollout.py`): they go through the fleet in batches, and each is confirmed
only after the deployer reconnected with the pinned key and the health checks passed; the host rolls
itself back when the confirmation does not come in time, and a failed health check rolls it back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shlex
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncssh
import pulumi
from pulumi.dynamic import CheckFailure, CheckResult

from .. import flakes, rollout
from ..ssh import CommandResult, HostKeyMismatch, SshError, connect, run
from .base import FleetStep, HostContext, HostError, HostUntouched, host_address, is_unknown, secret_options
from .install import host_flake
from .rescue import wants_install

_POLL_SECONDS = 1.0
_READ_SECONDS = 20.0
# Kept free at the end of a confirmation window: the confirmation must reach the host before it ends.
_CONFIRM_MARGIN_SECONDS = 3.0
# After a window ended unconfirmed: how long the host may take to roll back and answer again.
_ROLLBACK_GRACE_SECONDS = 60.0
# Where `call_state` hands the rollout's gate to `apply_host`.
_GATE = "__rollout_gate"


def _rolled_back(record: Mapping[str, Any] | None, shown: Mapping[str, str] | None = None) -> str | None:
    """What a confirmation record says was rolled back, or None when it was not. `shown`: the flake as the
    config gives it, by the reference the host built (a sent source)."""
    if not record or record.get("state") not in ("rolled-back", "rollback-failed"):
        return None
    previous = record.get("previous") or {}
    new = record.get("new") or {}
    if record["state"] == "rollback-failed":
        return f"rolling back failed: {record.get('reason')}"
    to = (record.get("rolled_back") or {}).get("to_system")
    names: Mapping[Any, Any] = shown or {}
    return (
        f"the host rolled back from {new.get('system')} (flake {names.get(record.get('flake'), record.get('flake'))}) "
        f"to generation {previous.get('generation')} ({to}, flake "
        f"{names.get(previous.get('flake'), previous.get('flake'))}): {record.get('reason')}"
    )


def needs_switch(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """A new flake; with evaluation on, a new system (the recorded one is what the host ran at convergence);
    with evaluation off, another source than the one the host built. Turning evaluation on or off alone
    switches nothing."""
    if old.get("flake") != new.get("flake"):
        return True
    if new.get("system") is not None:
        return old.get("system") != new.get("system")
    return new.get("source") is not None and new.get("source") != built_source(old)


def built_source(old: Mapping[str, Any]) -> str | None:
    """The content hash of the newest source known to build the system a host runs: recorded with
    evaluation off (`source`), or when an update evaluated it to the system the host runs (`system_source`),
    else the one it built (in its `host_ref`: `path:/var/lib/nix-dabei/flakes/<id>?narHash=<hash>`)."""
    for field in ("source", "system_source"):
        if old.get(field):
            return str(old[field])
    hashes = parse_qs(urlsplit(str(old.get("host_ref") or "")).query).get("narHash")
    return hashes[0] if hashes else None


def in_place_candidates(olds: Mapping[str, Any], news: Mapping[str, Any]) -> list[str]:
    """Hosts an update would switch in place, as far as the inputs tell (a preview knows nothing more): an
    installed host, not reinstalled, whose flake, source or system changed. A host a refresh found drifted
    is not among them (check sees inputs, the drift is in the outputs); the run's gate adds it."""
    found = []
    for name, new in news.items():
        old = olds.get(name)
        if not isinstance(old, Mapping) or not isinstance(new, Mapping) or is_unknown(new):
            continue
        same_server = all(old.get(f) == new.get(f) for f in ("server_id", "reinstall"))
        if same_server and needs_switch(old, new):
            found.append(name)
    return found


class NoReceive(HostError):
    """The host's `nix-dabei` predates `nix-dabei receive`: an image of an earlier release installed it."""


def _check_received(done: CommandResult, what: str) -> None:
    """Raise NoReceive for a host program without `receive`, HostError for any other failure."""
    if done.exit_status == 0:
        return
    stderr = str(done.stderr or "").strip()
    if "invalid choice: 'receive'" in stderr:
        raise NoReceive(
            f"sending {what} failed: the host's nix-dabei predates `nix-dabei receive` (its image was built with "
            f"an earlier release's nix-dabei). Update the nix-dabei input of your image flake and rebuild the "
            f"image; an installed host takes a local flake after one switch to a flake it fetches itself "
            f"(github:…, git+https:…), or give it a new `reinstall` ID"
        )
    raise HostError(f"sending {what} failed: {stderr[-500:]}")


def source_archive(path: str) -> bytes:
    """A flake source (a store path on the deployer) as an uncompressed tar of its contents."""
    if not Path(path).is_dir():
        raise HostError(f"the flake source {path} is not in this machine's Nix store any more: run `up` again")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in sorted(Path(path).iterdir()):
            archive.add(entry, arcname=entry.name)
    return buffer.getvalue()


def _failure(status: Mapping[str, Any]) -> str:
    st = status.get("status") or {}
    attempts = st.get("attempt")
    text = f"first boot failed in phase {st.get('phase')!r} after {attempts} attempt(s): {st.get('last_error')}"
    if "unable to download" in str(st.get("last_error")):
        text += (
            " (the host fetches public flake inputs itself; for a private repository, `sendInputs: all` has "
            "the deployer send every input)"
        )
    journal = (status.get("journal") or "").strip()
    if journal:
        tail = "\n".join("    " + line for line in journal.splitlines()[-30:])
        text += f"\n  journal tail:\n{tail}"
    return text


class FirstBootProvider(FleetStep):
    step = "firstboot"
    # What the program decides: a (re)installed server or a new flake. What the install step recorded
    # (installed image, rescue boot id) is read, not compared: a preview does not know it yet.
    # `system`: the store path the host's flake evaluates to (the hosts a commit changes, and only those);
    # `source`: the flake source's hash, given instead when evaluation is off.
    host_fields = ("server_id", "reinstall", "flake", "system", "source", "authorized_keys")
    upstream = "installed"

    def wants_action(self, name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """A host (re)installed by the install step, a new flake, system or (evaluation off) source, new
        authorized keys for root, or drift that a refresh recorded."""
        if wants_install(old, new):
            return True
        assert old is not None
        return (
            bool(old.get("drift")) or needs_switch(old, new) or old.get("authorized_keys") != new.get("authorized_keys")
        )

    secret_inputs = ("deploy_private_key",)

    def check_inputs(self, news: dict[str, Any]) -> list[CheckFailure]:
        problems = []
        plan = news.get("rollout")
        if plan is not None and not is_unknown(plan):
            problems += rollout.check_rollout("rollout", plan)
        checks = news.get("health_checks")
        if checks is not None and not is_unknown(checks):
            if not isinstance(checks, Mapping):
                problems.append(("health_checks", "expected a map of host name to a list of health checks"))
                checks = {}
            for name, host_checks in checks.items():
                if not isinstance(host_checks, list):
                    problems.append((f"health_checks.{name}", "expected a list of health checks"))
                    continue
                for i, check in enumerate(host_checks):
                    problems += rollout.check_health_check(f"health_checks.{name}[{i}]", check)
        return [CheckFailure(prop, reason) for prop, reason in problems]

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Also fills in `rollout.batches`: the hosts this update will switch in place, batch by batch, so
        the preview shows how the rollout will go."""
        result = super().check(olds, news)
        hosts = news.get("hosts")
        plan = news.get("rollout")
        if result.failures or not isinstance(hosts, Mapping) or not isinstance(plan, Mapping) or is_unknown(plan):
            return result
        names = in_place_candidates(olds.get("hosts") or {}, hosts)
        batches = rollout.plan_batches(names, plan.get("max_unavailable", "1"), len(hosts))
        return CheckResult({**news, "rollout": {**plan, "batches": batches}}, [])

    def call_state(
        self, props: Mapping[str, Any], hosts: Mapping[str, Any], todo: list[str], olds: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Hosts switched in place go batch by batch through a gate; installs run at once."""
        in_place = [n for n in todo if self._in_place(olds.get(n), self.with_upstream(props, hosts, n))]
        plan = props.get("rollout") or {}
        batches = rollout.plan_batches(in_place, plan.get("max_unavailable", "1"), len(hosts))
        if batches:
            text = "; then ".join(", ".join(batch) for batch in batches)
            pulumi.log.info(f"firstboot: in-place rollout in {len(batches)} batch(es): {text}")
        return {_GATE: rollout.RolloutGate(batches)}

    def keep(self, old: Mapping[str, Any], new: Mapping[str, Any], props: Mapping[str, Any]) -> dict[str, Any]:
        """A host left alone whose evaluated system is the one it runs: the current source builds that
        system too (`system_source`), so turning evaluation off later does not switch it again."""
        kept = super().keep(old, new, props)
        if "source" not in new:  # evaluation is on again: a source recorded while it was off is stale
            kept.pop("source", None)
        source = (props.get("sources") or {}).get(new.get("flake"))
        same_system = new.get("system") and new.get("system") == old.get("system")
        if source and same_system and source["nar_hash"] != built_source(old):
            kept["system_source"] = source["nar_hash"]
        return kept

    @staticmethod
    def _in_place(old: Mapping[str, Any] | None, host: Mapping[str, Any]) -> bool:
        """An installed host the install step left alone: a new flake is switched in place."""
        return bool(
            old is not None
            and old.get("system")
            and all(old.get(f) == host.get(f) for f in ("server_id", "installed_image", "rescue_boot_id"))
        )

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
            raise HostError(
                f"refusing the host: {exc}; if it was reinstalled outside nix-dabei, give it a new `reinstall` "
                "ID to install it again"
            ) from None
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

    async def _send_inputs(
        self, ctx: HostContext, conn: asyncssh.SSHClientConnection, source: Mapping[str, Any]
    ) -> None:
        """The flake inputs the host cannot fetch itself (`flakes.lock`), into its Nix store: only when it
        lacks any (`nix-dabei receive --missing`), as one compressed export (`nix-dabei receive --inputs`)."""
        paths = [str(p) for p in source.get("inputs") or []]
        if not paths:
            return
        asked = await run(
            conn, "nix-dabei receive --missing " + " ".join(map(shlex.quote, paths)), timeout=60, check=False
        )
        try:
            missing = json.loads(asked.stdout) if asked.exit_status == 0 else None
        except ValueError:
            missing = None
        if not isinstance(missing, list):
            _check_received(asked, f"the inputs of flake {source['url']}")
            raise HostError(f"asking the host which flake inputs it lacks failed: {asked.stdout.strip()[-500:]}")
        if not missing:
            return
        try:
            stream = await asyncio.to_thread(
                flakes.export_inputs, paths, flakes.pinned(source["path"], source["nar_hash"])
            )
        except flakes.FlakeError as exc:
            raise HostError(str(exc)) from None
        done = await run(
            conn, "nix-dabei receive --inputs", input=stream, timeout=max(1.0, ctx.remaining()), check=False
        )
        _check_received(done, f"the inputs of flake {source['url']}")
        ctx.log(f"{len(missing)} flake input(s) of {source['url']} sent ({len(stream)} bytes compressed)")

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
        _check_received(done, f"the flake source {source['url']}")
        ctx.log(f"flake source {source['url']} sent ({len(archive)} bytes)")

    async def apply_host(self, ctx: HostContext, host: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        deploy_key = props["deploy_private_key"]
        checks = list((props.get("health_checks") or {}).get(ctx.name) or [])
        old = ctx.old
        sources = props.get("sources") or {}
        host = {**host, "host_ref": host_flake(host, sources)}
        source = sources.get(host["flake"])
        if source:
            # Sent before any switch (and before a first boot's rebuild, which waits for it): receiving
            # changes nothing the host runs.
            conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
            with contextlib.closing(conn):
                try:
                    # The inputs first: the host's rebuild starts once the source is there.
                    await self._send_inputs(ctx, conn, source)
                    await self._send_source(ctx, conn, source)
                except NoReceive:
                    if not (self._in_place(old, host) and flakes.host_fetches(str(source["url"]))):
                        raise
                    # An installed host of an earlier release: it fetches the locked revision itself, as
                    # hosts did before sources were sent; its next switch brings this release's program.
                    host = {**host, "host_ref": str(source["url"])}
                    ctx.log(f"the host's nix-dabei predates `receive`: it fetches {source['url']} itself")
        if self._in_place(old, host):
            assert old is not None
            gate: rollout.RolloutGate = props[_GATE]
            try:
                await gate.enter(ctx.name)
            except rollout.HostNotTouched as exc:
                raise HostUntouched(str(exc)) from None
            number, total = gate.position(ctx.name)
            ok = False
            try:
                if old.get("authorized_keys") != host.get("authorized_keys"):
                    await self._set_authorized_keys(ctx, host, deploy_key)
                if needs_switch(old, host) or old.get("drift"):
                    ctx.log(f"applying flake {host['flake']} in place (batch {number} of {total})")
                    shown = {str(old.get("host_ref") or old.get("flake")): str(old.get("flake"))}
                    await self._switch_in_place(ctx, host, props, checks, {**shown, host["host_ref"]: host["flake"]})
                    checks = []  # passed before the confirmation
                ok = True
            finally:
                await gate.leave(ctx.name, ok)
        status = await self._wait_converged(ctx, host, deploy_key)
        st = status["status"]
        if st.get("flake") and st["flake"] != host["host_ref"]:
            raise HostError(f"the host converged on flake {st['flake']!r}, not {host['host_ref']!r}")
        expected, running = host.get("system"), status.get("system")
        if expected and running != expected:
            raise HostError(
                f"the host runs {running}, not {expected} that its flake {host['flake']} evaluates to on the deployer"
            )
        if checks:
            await self._first_boot_checks(ctx, host, deploy_key, checks)
        ctx.log(f"converged on {running}")
        return {
            "system": running,
            "host_ref": host["host_ref"],
            "source_url": source["url"] if source else None,
            "boot_id": status.get("boot_id"),
            "converged_at": st.get("finished_at"),
            "drift": None,
        }

    async def _set_authorized_keys(self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str) -> None:
        """Root's keys on a running host, replaced in place (`nix-dabei authorized-keys`); the deploy key
        is the first of them, so the component can always log in again."""
        ctx.log(f"setting root's {len(host['authorized_keys'])} authorized key(s)")
        conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
        with contextlib.closing(conn):
            keys = "".join(f"{k}\n" for k in host["authorized_keys"])
            await run(conn, "nix-dabei authorized-keys", input=keys, timeout=60)

    async def _first_boot_checks(
        self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str, checks: list[Mapping[str, Any]]
    ) -> None:
        """Health checks after a first boot; a failure fails the host (a first boot has no earlier
        generation of this configuration to return to)."""
        conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
        with contextlib.closing(conn):
            failure = await rollout.run_checks(checks, host_address(host), conn, ctx.deadline, ctx.log)
        if failure is not None:
            raise HostError(f"{failure}\n  after the first boot; the host keeps the system it booted")

    async def _switch_in_place(
        self,
        ctx: HostContext,
        host: Mapping[str, Any],
        props: Mapping[str, Any],
        checks: list[Mapping[str, Any]],
        shown: Mapping[str, str],
    ) -> None:
        """Switch, reconnect, check, confirm: or roll back and say what was rolled back (`shown`: the
        flakes as the config gives them, by the reference the host built)."""
        deploy_key = props["deploy_private_key"]
        window = float((props.get("rollout") or {}).get("confirm_seconds") or rollout.DEFAULT_CONFIRM_SECONDS)
        conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
        with contextlib.closing(conn):
            status = await self._status(conn)
            if "confirm" not in (status.get("features") or []):
                # Installed by a release before confirmed switches: its nix-dabei has no `--confirm-seconds`.
                ctx.log("the host's nix-dabei predates confirmed switches: switching without automatic rollback")
                await self._apply(ctx, conn, host["host_ref"])
                failure = await rollout.run_checks(checks, host_address(host), conn, ctx.deadline, ctx.log)
                if failure is not None:
                    raise HostError(f"{failure}\n  after the switch; no rollback: the host's nix-dabei predates it")
                return
            cmd = f"nix-dabei apply --flake {shlex.quote(host['host_ref'])} --confirm-seconds {window:g}"
            cut = ""
            try:
                done = await run(conn, cmd, timeout=max(1.0, ctx.remaining()), check=False)
                try:
                    answer = json.loads(done.stdout)
                except ValueError:
                    raise HostError(f"`nix-dabei apply` answered no status: {done.stderr.strip()[-500:]}") from None
                switched = done.exit_status == 0
            except SshError as exc:
                # A switch that restarts the network cuts the connection; the switch goes on without it
                # (`apply` ignores SIGHUP), so follow it over a new one.
                cut = f"the connection broke off during the switch ({exc}); "
                ctx.log(f"{cut}following the switch over a new connection")
                answer = await self._follow_switch(ctx, host, deploy_key)
                switched = (answer.get("confirm") or {}).get("state") == "awaiting-confirmation"
        record = answer.get("confirm") or {}
        # The window opened when the switch ended, a moment before the answer arrived.
        left = float(record.get("confirm_by") or 0) - time.time() if cut else window
        window_end = time.monotonic() + min(window, left) - _CONFIRM_MARGIN_SECONDS
        if not switched:
            rolled = _rolled_back(record, shown)
            if rolled and (answer.get("status") or {}).get("phase") == "converged":
                raise HostError(cut + rolled)
            text = _failure(answer)
            raise HostError(f"{cut}{text}\n  {rolled}" if rolled else cut + text)
        token = str(record["token"])
        ctx.log(f"switched to {answer.get('system')}; confirming within {window:g}s")
        try:
            conn = await self._connect(ctx, host, deploy_key, min(ctx.deadline, window_end))
        except HostError as exc:
            reason = f"no SSH connection with the pinned key after the switch ({exc})"
            outcome = await self._outcome_after_window(ctx, host, deploy_key, window_end, token, reason, shown)
            raise HostError(outcome) from None
        with contextlib.closing(conn):
            failure = await rollout.run_checks(checks, host_address(host), conn, min(ctx.deadline, window_end), ctx.log)
            if failure is not None:
                reason = f"health check {failure.name!r} failed"
                back = await run(
                    conn, f"nix-dabei rollback --token {token} --reason {shlex.quote(reason)}", timeout=600, check=False
                )
                raise HostError(f"{failure}\n  after the switch; {self._rollback_answer(back.stdout, shown)}")
            confirmed = await run(conn, f"nix-dabei confirm --token {token}", timeout=60, check=False)
        if confirmed.exit_status != 0:
            raise HostError(f"the confirmation came too late; {self._rollback_answer(confirmed.stdout, shown)}")
        ctx.log("switch confirmed")

    async def _follow_switch(self, ctx: HostContext, host: Mapping[str, Any], deploy_key: str) -> dict[str, Any]:
        """Reconnect and read `nix-dabei status` until the switch of `host['host_ref']` no longer runs."""
        while True:
            try:
                conn = await self._connect(ctx, host, deploy_key, ctx.deadline)
            except HostError:
                if ctx.remaining() < _POLL_SECONDS:
                    raise
                await asyncio.sleep(_POLL_SECONDS)
                continue
            with contextlib.closing(conn):
                try:
                    while True:
                        status = await self._status(conn)
                        record = status.get("confirm") or {}
                        if record.get("flake") == host["host_ref"] and record.get("state") != "switching":
                            return status
                        if ctx.remaining() < _POLL_SECONDS:
                            raise HostError(
                                f"the switch did not end before the deadline; it is {record.get('state')!r}"
                            )
                        await asyncio.sleep(_POLL_SECONDS)
                except SshError:
                    continue

    @staticmethod
    def _rollback_answer(stdout: str, shown: Mapping[str, str]) -> str:
        try:
            answer = json.loads(stdout)
        except ValueError:
            return f"the host's answer about the rollback is not JSON: {stdout[:200]!r}"
        record = answer.get("confirm")
        return _rolled_back(record, shown) or f"the switch is {(record or {}).get('state')!r}: {answer.get('error')}"

    async def _outcome_after_window(
        self,
        ctx: HostContext,
        host: Mapping[str, Any],
        deploy_key: str,
        window_end: float,
        token: str,
        reason: str,
        shown: Mapping[str, str],
    ) -> str:
        """The host could not be reached to confirm: wait for its own rollback, then report it."""
        ctx.log(f"{reason}; waiting for the host to roll itself back")
        await asyncio.sleep(max(0.0, window_end + _CONFIRM_MARGIN_SECONDS - time.monotonic()))
        until = min(ctx.deadline, time.monotonic() + _ROLLBACK_GRACE_SECONDS)
        while True:
            # Refused logins too are tried again: the host may still be rolling back.
            try:
                conn = await self._connect(ctx, host, deploy_key, until)
                break
            except HostError as exc:
                if time.monotonic() + _POLL_SECONDS >= until:
                    return f"{reason}; the host does not answer after its confirmation window either ({exc})"
                await asyncio.sleep(_POLL_SECONDS)
        with contextlib.closing(conn):
            while True:
                record = (await self._status(conn)).get("confirm") or {}
                if record.get("token") != token or record.get("state") not in ("switching", "awaiting-confirmation"):
                    break
                if ctx.remaining() < _POLL_SECONDS:
                    break
                await asyncio.sleep(_POLL_SECONDS)
        return f"{reason}; {_rolled_back(record, shown) or 'the switch is ' + repr(record.get('state'))}"

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
        rollout: pulumi.Input[dict[str, Any]] | None = None,
        health_checks: pulumi.Input[dict[str, Any]] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            "hosts": hosts,
            "installed": installed,
            "sources": sources,
            "deploy_private_key": deploy_private_key,
            "deadline_seconds": deadline_seconds,
            # How in-place updates go through the fleet (`rollout.Rollout.wire()`; `batches` filled in
            # by check()), and each host's health checks ({name: [HealthCheck.wire(), ...]}).
            "rollout": rollout if rollout is not None else {"max_unavailable": "1"},
            "health_checks": health_checks or {},
        }
        super().__init__(FirstBootProvider(), name, props, secret_options(FirstBootProvider, opts))
