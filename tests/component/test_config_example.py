"""The example stack (examples/fleet) reads as the README says: every key accepted, typed as meant."""

from __future__ import annotations

from pathlib import Path

import yaml

from dabei_component import validation
from dabei_component.component import validate
from dabei_component.program import fleet_args_from_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet" / "Pulumi.example.yaml"


def test_the_example_stack_is_valid_config() -> None:
    config = yaml.safe_load(EXAMPLE.read_text())["config"]
    args = fleet_args_from_config(
        config["nix-dabei:image"], config["nix-dabei:hosts"], config.get("nix-dabei:deadlines")
    )
    assert validate(args) == []
    ipv6_only = next(h for h in args.hosts if h.public_nets)
    assert ipv6_only.public_nets is not None
    assert [n.ipv4_enabled for n in ipv6_only.public_nets] == [False]
    assert ipv6_only.delete_protection is True and ipv6_only.rebuild_protection is True
    assert validation.ssh_keys("x", args.hosts[0].ssh_keys) == []
