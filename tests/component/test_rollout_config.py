"""Health checks and the rollout from stack config to the first-boot step: typed config, errors naming the
config key, batch sizes, the batch gate, and the batches the step's `check()` puts into the preview."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dabei_component.component import InvalidArgs, validate
from dabei_component.keys import generate_ssh_keypair
from dabei_component.program import config_key, fleet_args_from_config
from dabei_component.rollout import HealthCheck, HostNotTouched, Rollout, RolloutGate, batch_size, plan_batches
from dabei_component.steps.firstboot import FirstBootProvider

PROJECT = Path(__file__).resolve().parents[2]
IMAGE = {"flake": "github:example/infra", "attr": "packages.x86_64-linux.image"}


def host(name: str = "web-1", **extra: Any) -> dict[str, Any]:
    return {"name": name, "serverType": "cx22", "location": "fsn1", "flake": "github:example/infra", **extra}


def problems_of(**kwargs: Any) -> list[tuple[str, str]]:
    """The problems of a config, each named by its config key, as `pulumi up` reports them."""
    hosts = kwargs.pop("hosts", [host()])
    try:
        args = fleet_args_from_config(IMAGE, hosts, **kwargs)
    except InvalidArgs as exc:
        return exc.problems
    return [(config_key(prop), reason) for prop, reason in validate(args)]


def test_typed_config_becomes_dataclasses() -> None:
    args = fleet_args_from_config(
        IMAGE,
        [host(healthChecks=[{"command": "systemctl is-active nginx", "withinSeconds": "30"}])],
        health_checks=[
            {"name": "web", "http": "http://{host}/health", "expectStatus": "204", "timeoutSeconds": 5},
            {"tcp": "443"},
        ],
        rollout={"maxUnavailable": "25%", "confirmSeconds": 90},
    )
    assert args.rollout == Rollout(max_unavailable="25%", confirm_seconds=90.0)
    assert args.health_checks == [
        HealthCheck(name="web", http="http://{host}/health", expect_status=204, timeout_seconds=5.0),
        HealthCheck(tcp=443),
    ]
    assert args.hosts[0].health_checks == [HealthCheck(command="systemctl is-active nginx", within_seconds=30.0)]
    assert validate(args) == []
    assert args.health_checks[1].wire() == {
        "name": "tcp 443",
        "tcp": 443,
        "expect_status": 200,
        "within_seconds": 60.0,
        "timeout_seconds": 10.0,
    }
    # A count as a number or as digits.
    assert fleet_args_from_config(IMAGE, [host()], rollout={"maxUnavailable": "2"}).rollout.max_unavailable == 2


@pytest.mark.parametrize(
    ("kwargs", "key", "words"),
    [
        ({"rollout": {"maxUnavailable": "0"}}, "nix-dabei:rollout.maxUnavailable", "percentage"),
        ({"rollout": {"maxUnavailable": "150%"}}, "nix-dabei:rollout.maxUnavailable", "percentage"),
        ({"rollout": {"maxUnavailable": True}}, "nix-dabei:rollout.maxUnavailable", "percentage"),
        ({"rollout": {"confirmSeconds": 2}}, "nix-dabei:rollout.confirmSeconds", "between 5 and 86400"),
        ({"rollout": {"confirm": 2}}, "nix-dabei:rollout.confirm", "unknown key"),
        ({"rollout": [1]}, "nix-dabei:rollout", "maxUnavailable"),
        ({"health_checks": [{"command": "true", "tcp": 80}]}, "nix-dabei:healthChecks[0]", "exactly one of"),
        ({"health_checks": [{}]}, "nix-dabei:healthChecks[0]", "exactly one of"),
        ({"health_checks": [{"http": "ftp://x/"}]}, "nix-dabei:healthChecks[0].http", "http://"),
        ({"health_checks": [{"tcp": 70000}]}, "nix-dabei:healthChecks[0].tcp", "between 1 and 65535"),
        ({"health_checks": [{"tcp": "https"}]}, "nix-dabei:healthChecks[0].tcp", "a port number"),
        (
            {"health_checks": [{"http": "http://{host}/", "expectStatus": 42}]},
            "nix-dabei:healthChecks[0].expectStatus",
            "HTTP status",
        ),
        ({"health_checks": [{"tcp": 22, "withinSeconds": 0}]}, "nix-dabei:healthChecks[0].withinSeconds", "seconds"),
        ({"health_checks": [{"tcp": 22, "every": 3}]}, "nix-dabei:healthChecks[0].every", "unknown key"),
        ({"health_checks": "tcp 22"}, "nix-dabei:healthChecks", "expected a list"),
        (
            {"hosts": [host(healthChecks=[{"command": " "}])]},
            "nix-dabei:hosts[0].healthChecks[0].command",
            "shell command",
        ),
    ],
)
def test_a_bad_check_or_rollout_is_named_by_its_config_key(kwargs: dict[str, Any], key: str, words: str) -> None:
    problems = problems_of(**kwargs)
    assert [p for p, _ in problems] == [key], problems
    assert words in problems[0][1]


def test_batch_sizes_count_or_percentage_of_the_fleet() -> None:
    assert batch_size("1", 10) == 1
    assert batch_size(3, 10) == 3
    assert batch_size("25%", 10) == 2  # rounded down
    assert batch_size("5%", 10) == 1  # at least one
    assert batch_size("100%", 4) == 4
    assert plan_batches(["c", "a", "b", "d", "e"], 2, 5) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_batches([], 1, 3) == []


def test_the_gate_runs_batches_in_turn_and_stops_after_a_failed_one() -> None:
    gate = RolloutGate([["a", "b"], ["c"], ["d"]])
    order: list[str] = []

    async def host(name: str, ok: bool, seconds: float) -> str:
        try:
            await gate.enter(name)
        except HostNotTouched as exc:
            return str(exc)
        order.append(f"{name}+")
        await asyncio.sleep(seconds)
        order.append(f"{name}-")
        await gate.leave(name, ok)
        return "ok" if ok else "failed"

    async def everyone() -> list[str]:
        return await asyncio.gather(
            host("d", True, 0), host("c", True, 0), host("a", True, 0.05), host("b", False, 0.1)
        )

    d, c, a, b = asyncio.run(everyone())
    assert (a, b) == ("ok", "failed")
    assert c == d == "not updated: batch 1 of 3 (b failed) stopped the rollout; this host keeps its system"
    assert order == ["a+", "b+", "a-", "b-"]  # both of batch 1 at once, nothing after it


def test_check_puts_the_in_place_batches_into_the_inputs() -> None:
    key = generate_ssh_keypair().public

    def hosts(flakes: dict[str, str], reinstall: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            name: {
                "server_id": i + 1,
                "ipv4": f"192.0.2.{i + 1}",
                "hostname": name,
                "flake": f"github:example/infra?rev={flake}",
                "host_public_key": key,
                "authorized_keys": [key],
                **({"reinstall": reinstall[name]} if name in (reinstall or {}) else {}),
            }
            for i, (name, flake) in enumerate(sorted(flakes.items()))
        }

    old = {
        "hosts": hosts({"a": "v1", "b": "v1", "c": "v1", "d": "v1"}),
        "rollout": {"max_unavailable": "1"},
        "deadline_seconds": 600,
    }
    # b is reinstalled (a first boot, not an in-place switch), e is new, d keeps its flake.
    new_hosts = hosts({"a": "v2", "b": "v2", "c": "v2", "d": "v1", "e": "v2"}, {"b": "2026-12-01"})
    news = {"hosts": new_hosts, "rollout": {"max_unavailable": "50%", "confirm_seconds": 60.0}, "deadline_seconds": 600}
    provider = FirstBootProvider()
    checked = provider.check(old, news)
    assert [(f.property, f.reason) for f in checked.failures] == []
    assert checked.inputs["rollout"] == {"max_unavailable": "50%", "confirm_seconds": 60.0, "batches": [["a", "c"]]}
    # Nothing to switch: no batches.
    assert provider.check(old, dict(old)).inputs["rollout"]["batches"] == []
