"""Secrets never leak: a full install (one host failing first, then fixed and converged) with distinctive
secret values, scanning every provider output, every log line (provider servers, the simulator's logging,
the simulated machines' logs), every exception text and the serialized non-secret state.

The secrets: the API token, the generated deploy key and host keys, and the rescue root passwords the API
answered (the component drops them; the test reads them from the simulator's answers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from relhelpers import SimThread, Stack, fleet_args, when_created

from dabei_component.localup import UpFailed

pytestmark = pytest.mark.timeout(300)


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log record of this process at DEBUG, the simulator's (it runs in-process) included."""
    handler = Collected()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


def secrets(sim: SimThread, stack: Stack) -> list[str]:
    keys = stack.keys()
    private = [keys["deploy_private_key"], *keys["host_private_keys"].values()]
    # The base64 body of each private key too, in case something printed it without its armour.
    bodies = [line for key in private for line in key.splitlines() if len(line) > 40]
    assert sim.api.root_passwords, "the API answered no rescue password"
    return [sim.token, *private, *bodies, *sim.api.root_passwords]


def non_secret_state(stack: Stack) -> str:
    """The state as stored in plain text: every input and output but the ones marked secret (and the
    provider)."""
    plain = {key: {"inputs": r.plain_inputs(), "outputs": r.plain_outputs()} for key, r in stack.state.items()}
    return json.dumps(plain, default=str)


def machine_logs(sim: SimThread) -> str:
    texts = []
    for server in sim.control("GET", "/servers")["servers"]:
        state = Path(server["state_dir"])
        texts += [p.read_text(errors="replace") for p in (state / "log").glob("*.log")]
        texts += [p.read_text(errors="replace") for p in (state / "rootfs/var/log").rglob("*.log")]
    return "\n".join(texts)


def test_no_secret_in_outputs_logs_errors_or_state(
    sim: SimThread, new_stack: Callable[[], Stack], log_lines: list[str]
) -> None:
    stack = new_stack()
    args = fleet_args(stack.name, 2, ssh_port=sim.ssh_port)
    failing = stack.name + "-2"
    rootfs: dict[str, Path] = {}

    def break_second(id_: str, outs: dict[str, Any]) -> None:
        root = Path(sim.server(id_)["machine"]["rootfs"])
        rootfs[outs["name"]] = root
        if outs["name"] == failing:
            (root / "var/lib/nix-dabei-sim").mkdir(parents=True, exist_ok=True)
            (root / "var/lib/nix-dabei-sim/fail-rebuilds").write_text("always\n")

    with pytest.raises(UpFailed) as failed:
        stack.up(args, before=lambda engine: when_created(engine, "server", break_second))
    errors = [str(failed.value)]
    assert failing in errors[0] and "journal tail" in errors[0]

    (rootfs[failing] / "var/lib/nix-dabei-sim/fail-rebuilds").write_text("0\n")
    outputs = stack.up(args)
    assert all(h["system"] for h in outputs["hosts"].values())

    haystacks = {
        "program outputs": json.dumps(outputs, default=str),
        "non-secret state": non_secret_state(stack),
        "provider logs": stack.all_logs(),
        "log records": "\n".join(log_lines),
        "machine logs": machine_logs(sim),
        "errors": "\n".join(errors),
    }
    assert all(haystacks.values()), [k for k, v in haystacks.items() if not v]
    for secret in secrets(sim, stack):
        for where, text in haystacks.items():
            assert secret not in text, f"a secret ({len(secret)} characters) appears in the {where}"
