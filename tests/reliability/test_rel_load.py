"""Load: 50 servers installed at once against the simulator with its default rate limit (3600 requests an
hour, all of them available at the start): no failure, and no request over the budget (no 429 answer)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from relhelpers import SimThread, Stack, fleet_args

from dabei_component.component import Deadlines

pytestmark = pytest.mark.timeout(600)

SERVERS = 50


def test_fifty_servers_install_at_once_within_the_request_budget(
    sim: SimThread, new_stack: Callable[[], Stack]
) -> None:
    limit = sim.ratelimit()
    assert limit["limit"] == 3600 and limit["period"] == 3600
    stack = new_stack()
    args = fleet_args(
        stack.name, SERVERS, ssh_port=sim.ssh_port, deadlines=Deadlines(rescue=600, install=900, firstboot=900)
    )
    mark = sim.api.mark()

    outputs = stack.up(args)

    assert len(outputs["hosts"]) == SERVERS
    assert all(h["system"] for h in outputs["hosts"].values()), outputs["hosts"]
    answers = sim.api.since(mark)
    statuses = Counter(a.status for a in answers)
    assert statuses[429] == 0, statuses
    assert all(s < 400 for s in statuses), statuses
    assert len(answers) < limit["remaining"]
    assert sim.ratelimit()["remaining"] > 0
    per_route = Counter(f"{a.method} {a.route}" for a in answers)
    print(f"\n{len(answers)} API requests for {SERVERS} servers ({len(answers) / SERVERS:.1f} each): {dict(per_route)}")
