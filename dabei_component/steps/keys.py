"""Key material the component generates: one deploy key per fleet, one SSH host key per host.

The deploy key logs into the rescue system and, afterwards, the installed host as root. Each host key is
written into the host's seed, so the component knows the installed host's identity before it boots and
connects with strict host-key checking from the first packet. Private keys are secret outputs; the public
halves are plain outputs (they become known_hosts lines).
"""

from __future__ import annotations

import uuid
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ResourceProvider, UpdateResult

from ..keys import generate_ssh_keypair
from .base import is_unknown

SECRET_OUTPUTS = ["deploy_private_key", "host_private_keys"]


class SshKeysProvider(ResourceProvider):
    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        names = news.get("host_names")
        failures = []
        if not is_unknown(names) and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
            failures.append(CheckFailure("host_names", "expected a list of host names"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = is_unknown(news.get("host_names")) or sorted(olds.get("host_names") or []) != sorted(
            news["host_names"]
        )
        return DiffResult(changes=changed, replaces=[], delete_before_replace=False)

    def _outputs(self, names: list[str], olds: dict[str, Any]) -> dict[str, Any]:
        deploy_private = olds.get("deploy_private_key")
        deploy_public = olds.get("deploy_public_key")
        if not deploy_private:
            pair = generate_ssh_keypair()
            deploy_private, deploy_public = pair.private_openssh, pair.public
        old_private = olds.get("host_private_keys") or {}
        old_public = olds.get("host_public_keys") or {}
        private, public = {}, {}
        for name in sorted(names):
            if name in old_private:  # a host keeps its identity for as long as it is declared
                private[name], public[name] = old_private[name], old_public[name]
            else:
                pair = generate_ssh_keypair()
                private[name], public[name] = pair.private_openssh, pair.public
        return {
            "host_names": sorted(names),
            "deploy_public_key": deploy_public,
            "deploy_private_key": deploy_private,
            "host_public_keys": public,
            "host_private_keys": private,
        }

    def create(self, props: dict[str, Any]) -> CreateResult:
        return CreateResult(f"keys-{uuid.uuid4().hex[:12]}", self._outputs(props["host_names"], {}))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(self._outputs(news["host_names"], olds))


class SshKeys(pulumi.dynamic.Resource):
    host_names: pulumi.Output[list[str]]
    deploy_public_key: pulumi.Output[str]
    deploy_private_key: pulumi.Output[str]
    host_public_keys: pulumi.Output[dict[str, str]]
    host_private_keys: pulumi.Output[dict[str, str]]

    def __init__(
        self, name: str, host_names: pulumi.Input[list[str]], opts: pulumi.ResourceOptions | None = None
    ) -> None:
        secret = pulumi.ResourceOptions(additional_secret_outputs=SECRET_OUTPUTS)
        super().__init__(
            SshKeysProvider(),
            name,
            {
                "host_names": host_names,
                "deploy_public_key": None,
                "deploy_private_key": None,
                "host_public_keys": None,
                "host_private_keys": None,
            },
            pulumi.ResourceOptions.merge(opts, secret),
        )
