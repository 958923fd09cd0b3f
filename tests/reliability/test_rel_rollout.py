"""Safe in-place updates through the local engine: a configuration that locks SSH out is rolled back on the
first host and the rollout stops before the rest; a failing health check rolls back at once with its output;
the deployer killed during the confirmation window leaves the host to roll itself back; a good configuration
goes through the fleet in batches.

The hosts' flakes are real fixture flakes (each revision another system per host), locked on the deployer
and sent to the hosts. What a configuration does on a simulated host comes from the simulator's
`/_sim/flakes` table, keyed by the reference the host builds (the sent source): `ssh:
refused` makes the host's real sshd refuse root (`DenyUsers`) once switched, `health: failing` makes the
host's `app-health` command fail and its HTTP endpoint answer 503. Each host's system profile keeps
generations as NixOS does, so a rollback is seen where it happens: the profile's current generation and
`run/current-system`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from relhelpers import KillSwitch, SimThread, Stack, fleet_args

from dabei_component import flakes
from dabei_component.component import Deadlines, FleetArgs
from dabei_component.demo import demo_flake
from dabei_component.imaging import OFFLINE_NIX_ARGS
from dabei_component.localup import UpFailed
from dabei_component.program import declare
from dabei_component.rollout import HealthCheck, Rollout

pytestmark = pytest.mark.timeout(600)


def revision(stack: Stack, tag: str) -> str:
    """Another revision of the stack's hosts' flake: every host's system changes."""
    return demo_flake({f"{stack.name}-{i}": {"system": "x86_64-linux", "motd": tag} for i in range(1, 10)})


def host_ref(flake: str) -> str:
    """The reference a host builds for `flake`: its locked source as sent."""
    return flakes.lock(flake, os.getcwd(), OFFLINE_NIX_ARGS).host_ref


def behave(sim: SimThread, flake: str, **behaviour: str) -> None:
    """What the configuration of `flake` does once a host switched to it."""
    table = sim.control("GET", "/flakes")["flakes"]
    sim.control("PUT", "/flakes", {**table, host_ref(flake): behaviour})


def rootfs(sim: SimThread, stack: Stack, name: str) -> Path:
    return Path(sim.server(stack.hosts("firstboot")[name]["server_id"])["machine"]["rootfs"])


def generation(root: Path) -> str:
    return os.readlink(root / "nix/var/nix/profiles/system")


def running(root: Path) -> str:
    return os.readlink(root / "run/current-system")


def rebuilt(root: Path) -> list[str]:
    return (root / "var/lib/nix-dabei-sim/rebuilds.log").read_text().splitlines()


def confirm_record(root: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((root / "var/lib/nix-dabei/confirm.json").read_text())
    return record


def with_flake(args: FleetArgs, flake: str) -> FleetArgs:
    for host in args.hosts:
        host.flake = flake
    return args


def preview(stack: Stack, args: FleetArgs) -> tuple[dict[str, Any], list[list[str]] | None]:
    """The plan's changes and the rollout batches the first-boot step goes ahead with."""
    server = stack.provider()
    try:
        plan = stack.engine(server).preview(lambda: declare(args, name=stack.name))
    finally:
        server.close()
    print(plan.render())
    step = next((c for c in plan if c.name == f"{stack.name}-firstboot"), None)
    batches = step.inputs["rollout"]["batches"] if step is not None and step.inputs else None
    return plan.changes(), batches


def fleet(stack: Stack, sim: SimThread, count: int, rollout: Rollout, *checks: HealthCheck) -> FleetArgs:
    args = fleet_args(
        stack.name, count, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=120, install=180, firstboot=240)
    )
    args.rollout = rollout
    args.health_checks = list(checks)
    return args


def app_port(sim: SimThread, stack: Stack, name: str) -> int:
    port = sim.server(stack.hosts("firstboot")[name]["server_id"])["machine"]["app_port"]
    assert isinstance(port, int)
    return port


def test_a_config_that_locks_out_ssh_is_rolled_back_on_the_first_host_and_the_rollout_stops(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    args = fleet(stack, sim, 3, Rollout(max_unavailable=1, confirm_seconds=8), HealthCheck(command="app-health"))
    stack.up(args)
    flake = args.hosts[0].flake
    names = [h.name for h in args.hosts]
    before = {n: running(rootfs(sim, stack, n)) for n in names}
    bad = revision(stack, "locks-out-ssh")
    behave(sim, bad, ssh="refused")
    with_flake(args, bad)

    changes, batches = preview(stack, args)
    assert changes == {
        f"{stack.name}-firstboot": (
            "update",
            (
                *(f"hosts.{n}.{f}" for n in names for f in ("flake", "system")),
                "rollout.batches",
                *sorted(f"sources.{f}" for f in (flake, bad)),
            ),
        ),
    }
    assert batches == [[names[0]], [names[1]], [names[2]]]

    started = time.monotonic()
    with pytest.raises(UpFailed) as failed:
        stack.up(args)
    text = str(failed.value)
    print(text)
    first, second, third = names
    # The first host: switched, sshd refused the deploy key, the window ended, the host rolled itself back.
    assert re.search(rf"{first}: no SSH connection with the pinned key after the switch \(.*permission denied", text)
    assert re.search(rf"the host rolled back from /nix/store/\S+-nixos-system-{first} \(flake {re.escape(bad)}\)", text)
    assert f"to generation 1 ({before[first]}, flake {flake}): not confirmed within 8s of the switch" in text
    assert time.monotonic() - started >= 8, "the rollback waited for the host's own confirmation window"
    root = rootfs(sim, stack, first)
    assert running(root) == before[first] and generation(root) == "system-1-link"
    assert os.readlink(root / "nix/var/nix/profiles/system-2-link").endswith(f"-nixos-system-{first}")
    assert confirm_record(root)["state"] == "rolled-back"
    # The rollout stopped: the other hosts were never switched.
    assert "firstboot failed on 1 of 3 host(s), 2 more left untouched:" in text
    for name in (second, third):
        assert f"{name}: not updated: batch 1 of 3 ({first} failed) stopped the rollout" in text
        other = rootfs(sim, stack, name)
        assert rebuilt(other) == [host_ref(flake)] and running(other) == before[name]
    # The first host answers with its pinned key again, converged on its old configuration: no drift.
    server = stack.provider()
    try:
        refreshed = stack.engine(server).refresh()
    finally:
        server.close()
    assert refreshed.changes() == {}
    # The state still holds the old configuration, so the next preview shows the same rollout.
    assert preview(stack, args)[1] == batches


def test_a_failing_health_check_rolls_the_host_back_at_once_with_the_check_output(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    args = fleet(stack, sim, 2, Rollout(confirm_seconds=120))
    stack.up(args)
    first, second = (h.name for h in args.hosts)
    port = app_port(sim, stack, first)
    args.health_checks = [
        HealthCheck(tcp=port),
        HealthCheck(name="web", http=f"http://{{host}}:{port}/", within_seconds=4),
    ]
    before = running(rootfs(sim, stack, first))
    flake = args.hosts[0].flake
    sick = revision(stack, "unhealthy")
    behave(sim, sick, health="failing")

    started = time.monotonic()
    with pytest.raises(UpFailed) as failed:
        stack.up(with_flake(args, sick))
    text = str(failed.value)
    print(text)
    assert f"{first}: health check 'web' failed:" in text
    assert "HTTP 503 (expected 200)" in text and "unhealthy (simulated)" in text
    assert f"to generation 1 ({before}, flake {flake}): health check 'web' failed" in text
    assert time.monotonic() - started < 100, "rolled back at once, not at the end of the 120 s window"
    assert f"{second}: not updated" in text
    root = rootfs(sim, stack, first)
    assert running(root) == before and generation(root) == "system-1-link"
    # The old configuration is healthy again: the HTTP endpoint answers 200.
    status = HealthCheck(http=f"http://{stack.hosts('firstboot')[first]['ipv4']}:{port}/")
    assert status.http is not None
    import urllib.request

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(status.http, timeout=10) as answer:
        assert answer.status == 200


def test_the_deployer_killed_in_the_confirmation_window_leaves_the_host_to_roll_back(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    args = fleet(stack, sim, 1, Rollout(confirm_seconds=6), HealthCheck(command="app-health"))
    stack.up(args)
    name = args.hosts[0].name
    root = rootfs(sim, stack, name)
    before = running(root)
    new = revision(stack, "good")

    kill = KillSwitch(rf"\[{re.escape(name)}\] firstboot: switched to ")
    with pytest.raises(UpFailed):
        stack.up(with_flake(args, new), kill=kill)
    assert running(root) != before, "killed after the switch"
    give_up = time.monotonic() + 60
    while confirm_record(root)["state"] == "awaiting-confirmation":
        assert time.monotonic() < give_up, "the host never rolled back"
        time.sleep(0.5)
    record = confirm_record(root)
    assert record["state"] == "rolled-back" and record["reason"] == "not confirmed within 6s of the switch"
    assert running(root) == before and generation(root) == "system-1-link"

    # The next `up` switches again, and this time confirms.
    stack.up(args)
    assert confirm_record(root)["state"] == "confirmed"
    assert running(root) != before and generation(root) == "system-3-link"
    assert stack.hosts("firstboot")[name]["system"] == running(root)


def test_a_good_config_goes_through_the_fleet_in_batches(sim: SimThread, new_stack: Callable[[], Stack]) -> None:
    stack = new_stack()
    args = fleet(stack, sim, 3, Rollout(max_unavailable="67%", confirm_seconds=60), HealthCheck(command="app-health"))
    stack.up(args)
    names = [h.name for h in args.hosts]
    args.health_checks.append(HealthCheck(tcp=app_port(sim, stack, names[0])))
    new = revision(stack, "v2")
    with_flake(args, new)

    changes, batches = preview(stack, args)
    assert batches == [names[:2], names[2:]]  # 67 % of 3 hosts, rounded down: two at a time
    assert set(changes) == {f"{stack.name}-firstboot"}

    stack.up(args)
    log = stack.log_text()
    for name in names:
        root = rootfs(sim, stack, name)
        assert rebuilt(root)[-1] == host_ref(new) and generation(root) == "system-2-link"
        assert confirm_record(root)["state"] == "confirmed"
        assert stack.hosts("firstboot")[name]["system"] == running(root)
    assert f"[{names[0]}] firstboot: applying flake {new} in place (batch 1 of 2)" in log
    assert f"[{names[2]}] firstboot: applying flake {new} in place (batch 2 of 2)" in log
    # The second batch started only once both hosts of the first were confirmed.
    third_starts = log.index(f"[{names[2]}] firstboot: applying flake")
    for name in names[:2]:
        assert log.index(f"[{name}] firstboot: switch confirmed") < third_starts
    assert preview(stack, args)[0] == {}


def test_a_health_check_failing_after_a_first_boot_fails_the_host_with_its_output(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    stack = new_stack()
    check = HealthCheck(name="db", command="echo 'db: no connection' >&2; exit 3", within_seconds=3)
    args = fleet(stack, sim, 1, Rollout(), check)
    with pytest.raises(UpFailed) as failed:
        stack.up(args)
    text = str(failed.value)
    name = args.hosts[0].name
    assert f"{name}: health check 'db' failed:" in text
    assert "exit status 3" in text and "db: no connection" in text
    assert "after the first boot; the host keeps the system it booted" in text


def test_a_switch_that_cuts_the_connection_is_followed_checked_and_confirmed(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    """A switch that restarts the network breaks the SSH connection `nix-dabei apply` runs in: the switch
    goes on, and the deployer follows it over a new connection, checks the host and confirms."""
    stack = new_stack()
    args = fleet(stack, sim, 1, Rollout(confirm_seconds=60), HealthCheck(command="app-health"))
    stack.up(args)
    name = args.hosts[0].name
    root = rootfs(sim, stack, name)
    new = revision(stack, "new-network")
    behave(sim, new, session="cut")
    stack.up(with_flake(args, new))
    assert f"[{name}] firstboot: the connection broke off during the switch" in stack.log_text()
    assert "cut 1 SSH connection(s)" in sim.boot_log(stack.hosts("firstboot")[name]["server_id"])
    assert confirm_record(root)["state"] == "confirmed"
    assert rebuilt(root)[-1] == host_ref(new) and generation(root) == "system-2-link"
