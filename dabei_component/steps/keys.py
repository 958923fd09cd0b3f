"""Key material the component generates: one deploy key per fleet, one SSH host key per host.

The deploy key logs into the rescue system and, afterwards, the installed host as root. Each host key is
written into the host's seed, so the component knows the installed host's identity before it boots and
connects with strict host-key checking from the first packet. Private keys are secret outputs; the public
halves are plain outputs (they become known_hosts lines).

Each key is generated once and depends on nothing that changes with the fleet: the deploy key lives in
`SshKeys` (one per fleet, no inputs that vary), each host key in its own `HostKey`. A preview knows none
of the outputs of a dynamic resource it is about to update, so a key resource whose inputs followed the
host list would make every preview that adds a host show the fleet's keys (and everything built on them,
the deploy key's `hcloud.SshKey` first) as being replaced.

Stacks recorded before this layout hold every host key in `SshKeys` (`host_private_keys`,
`host_public_keys`). `SshKeys` keeps those outputs as they are, and a new `HostKey` adopts the recorded
key of its host instead of generating one, so an upgrade changes no host's identity.
"""

from __future__ import annotations

import uuid
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ResourceProvider

from .. import validation
from ..keys import generate_ssh_keypair, public_key_of
from .base import is_unknown

SECRET_OUTPUTS = ["deploy_private_key", "host_private_keys"]
HOST_KEY_SECRET_OUTPUTS = ["private_key", "adopt_private_key"]


class SshKeysProvider(ResourceProvider):
    """The fleet's deploy key. Its outputs never change once created (an update keeps them as recorded)."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        return CheckResult(news, [])

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # Nothing in the inputs can change a generated key; `host_names` of earlier releases is ignored.
        return DiffResult(changes=False, replaces=[], delete_before_replace=False)

    def create(self, props: dict[str, Any]) -> CreateResult:
        pair = generate_ssh_keypair()
        outs = {
            "deploy_public_key": pair.public,
            "deploy_private_key": pair.private_openssh,
            "host_public_keys": {},
            "host_private_keys": {},
        }
        return CreateResult(f"keys-{uuid.uuid4().hex[:12]}", outs)


class SshKeys(pulumi.dynamic.Resource):
    """The deploy key (and, in stacks recorded by earlier releases, their host keys: see the module doc)."""

    deploy_public_key: pulumi.Output[str]
    deploy_private_key: pulumi.Output[str]
    host_public_keys: pulumi.Output[dict[str, str]]
    host_private_keys: pulumi.Output[dict[str, str]]

    def __init__(self, name: str, opts: pulumi.ResourceOptions | None = None) -> None:
        secret = pulumi.ResourceOptions(additional_secret_outputs=SECRET_OUTPUTS)
        super().__init__(
            SshKeysProvider(),
            name,
            {
                "deploy_public_key": None,
                "deploy_private_key": None,
                "host_public_keys": None,
                "host_private_keys": None,
            },
            pulumi.ResourceOptions.merge(opts, secret),
        )


class HostKeyProvider(ResourceProvider):
    """One host's SSH host key: generated at create, or adopted from `adopt_private_key` when given."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        host = news.get("host")
        if not is_unknown(host):
            failures += [CheckFailure(p, r) for p, r in validation.hostname("host", host)]
        adopt = news.get("adopt_private_key")
        if adopt and not is_unknown(adopt):
            failures += [CheckFailure(p, r) for p, r in validation.private_key("adopt_private_key", adopt)]
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # A host keeps its identity for as long as it is declared: nothing changes a generated key.
        return DiffResult(changes=False, replaces=[], delete_before_replace=False)

    def create(self, props: dict[str, Any]) -> CreateResult:
        adopt = props.get("adopt_private_key")
        if adopt:
            private, public = adopt, public_key_of(adopt)
        else:
            pair = generate_ssh_keypair()
            private, public = pair.private_openssh, pair.public
        outs = {"host": props["host"], "public_key": public, "private_key": private, "adopted": bool(adopt)}
        return CreateResult(f"hostkey-{uuid.uuid4().hex[:12]}", outs)


class HostKey(pulumi.dynamic.Resource):
    """The SSH host key of one host (ed25519); `private_key` is a secret output."""

    public_key: pulumi.Output[str]
    private_key: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        host: str,
        adopt_private_key: pulumi.Input[str | None] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        secret = pulumi.ResourceOptions(additional_secret_outputs=HOST_KEY_SECRET_OUTPUTS)
        props = {
            "host": host,
            "adopt_private_key": adopt_private_key,
            "public_key": None,
            "private_key": None,
            "adopted": None,
        }
        super().__init__(HostKeyProvider(), name, props, pulumi.ResourceOptions.merge(opts, secret))
