"""Stack config for images per system and the evaluation switch, read as `pulumi config set --path` stores it."""

from __future__ import annotations

import pytest

from dabei_component.component import ImageArgs, InvalidArgs, validate
from dabei_component.program import fleet_args_from_config

HOSTS = [{"name": "web-1", "serverType": "cax11", "location": "fsn1", "flake": "."}]


def test_image_attr_per_system_and_explicit_map() -> None:
    args = fleet_args_from_config({"flake": "github:me/infra"}, HOSTS)
    assert args.image.attr_for("aarch64-linux") == "packages.aarch64-linux.image"
    assert args.evaluate is True
    image = {"flake": ".", "attr": "packages.{system}.img", "attrs": {"aarch64-linux": "packages.aarch64-linux.arm"}}
    args = fleet_args_from_config(image, HOSTS, evaluate="false")
    assert args.image.attr_for("x86_64-linux") == "packages.x86_64-linux.img"
    assert args.image.attr_for("aarch64-linux") == "packages.aarch64-linux.arm"
    assert args.evaluate is False
    assert ImageArgs(flake=".", attr="packages.x86_64-linux.image").attr_for("aarch64-linux") == (
        "packages.x86_64-linux.image"
    ), "one attribute without {system}: the image check refuses it for arm hosts"


def test_bad_values_are_named() -> None:
    with pytest.raises(InvalidArgs) as bad:
        fleet_args_from_config({"flake": ".", "attrs": {"riscv64-linux": "x"}}, HOSTS, evaluate="maybe")
    text = str(bad.value)
    assert "nix-dabei:image.attrs.riscv64-linux: expected a system of Hetzner's servers" in text
    assert "nix-dabei:evaluate: expected true or false, got 'maybe'" in text


def test_send_inputs_reads_local_or_all_and_names_anything_else() -> None:
    assert fleet_args_from_config({"flake": "."}, HOSTS).send_inputs == "local"
    assert fleet_args_from_config({"flake": "."}, HOSTS, send_inputs="all").send_inputs == "all"
    for value, shown in (("everything", "got 'everything'"), (True, "expected a string, got the boolean true")):
        with pytest.raises(InvalidArgs) as bad:
            fleet_args_from_config({"flake": "."}, HOSTS, send_inputs=value)
        assert "nix-dabei:sendInputs" in str(bad.value) and shown in str(bad.value), str(bad.value)


@pytest.mark.parametrize(
    ("flake", "hint"),
    [
        ("infra", "a directory is written ./infra"),
        (".#web-1", "leave out '#…': the component builds <flake>#<host name>"),
        ("git+file:./my infra", "write a directory with one as ./my dir or path:./my dir"),
    ],
)
def test_a_flake_written_as_users_often_do_is_refused_with_the_form_that_works(flake: str, hint: str) -> None:
    args = fleet_args_from_config({"flake": "github:me/infra"}, [{**HOSTS[0], "flake": flake}])
    [(prop, reason)] = validate(args)
    assert prop == "hosts[0].flake" and reason.endswith(hint), reason
