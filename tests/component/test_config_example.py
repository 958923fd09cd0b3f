"""The example fleet (examples/fleet) reads as the README says: its stack config through the config readers
with every key accepted and typed as meant, and its flake defining exactly the hosts the stack names, each
for the system its server type needs (evaluated with stand-ins for nixpkgs and nix-dabei: no nixpkgs here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from dabei_component import validation
from dabei_component.component import validate
from dabei_component.program import fleet_args_from_config
from dabei_component.rollout import Rollout

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet"
# Architectures of the server types the example uses (Hetzner's catalog: CX x86, CAX arm).
SYSTEMS = {"cx22": "x86_64-linux", "cax11": "aarch64-linux"}


def stack_config() -> dict:
    return yaml.safe_load((EXAMPLE / "Pulumi.example.yaml").read_text())["config"]


def test_the_example_stack_is_valid_config() -> None:
    config = stack_config()
    args = fleet_args_from_config(
        config["nix-dabei:image"],
        config["nix-dabei:hosts"],
        config.get("nix-dabei:deadlines"),
        health_checks=config.get("nix-dabei:healthChecks"),
        rollout=config.get("nix-dabei:rollout"),
    )
    assert validate(args) == []
    ipv6_only = next(h for h in args.hosts if h.public_nets)
    assert ipv6_only.public_nets is not None
    assert [n.ipv4_enabled for n in ipv6_only.public_nets] == [False]
    assert ipv6_only.delete_protection is True and ipv6_only.rebuild_protection is True
    assert validation.ssh_keys("x", args.hosts[0].ssh_keys) == []
    assert [c.name for c in args.health_checks] == ["sshd"]
    assert [c.name for c in args.hosts[0].health_checks] == ["web"]
    assert args.rollout == Rollout(max_unavailable=1, confirm_seconds=120.0)


def test_the_example_flake_defines_the_stacks_hosts_for_their_systems() -> None:
    stand_ins = """
      let
        flake = import FLAKE;
        nixpkgs = { lib.genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names); };
        nix-dabei = {
          lib.mkSystem = system: modules: { inherit system; modules = map toString modules; };
          packages = nixpkgs.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (s: { image = "image-${s}"; });
        };
        out = flake.outputs { self = out; inherit nixpkgs nix-dabei; };
      in {
        hosts = builtins.mapAttrs (_: h: h.system) out.nixosConfigurations;
        images = builtins.mapAttrs (_: p: p.image) out.packages;
      }
    """.replace("FLAKE", str(EXAMPLE / "flake.nix"))
    done = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", stand_ins],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    evaluated = json.loads(done.stdout)
    stack_hosts = {h["name"]: SYSTEMS[h["serverType"]] for h in stack_config()["nix-dabei:hosts"]}
    assert evaluated["hosts"] == stack_hosts
    assert set(evaluated["images"]) == {"x86_64-linux", "aarch64-linux"}
    # The image output the stack config names exists for every system the stack's server types need.
    args = fleet_args_from_config(stack_config()["nix-dabei:image"], stack_config()["nix-dabei:hosts"], None)
    for system in set(stack_hosts.values()):
        assert args.image.attr_for(system) == f"packages.{system}.image"
