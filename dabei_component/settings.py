"""Provider settings from stack configuration, read in each dynamic provider's `configure`.

Only names live in the serialized provider; the values (the token above all) are read when the provider
server configures it, so they never reach the state file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_SSH_PORT = 22


@dataclass(frozen=True)
class ProviderSettings:
    token: str | None
    endpoint: str | None
    ssh_port: int

    @classmethod
    def from_config(cls, config: Any) -> ProviderSettings:
        """`config` is the dynamic provider's `Config`: namespaced keys like `hcloud:token`."""
        port = config.get("nix-dabei:sshPort")
        try:
            ssh_port = int(port) if port not in (None, "") else DEFAULT_SSH_PORT
        except (TypeError, ValueError):
            raise ValueError(f"nix-dabei:sshPort must be a port number, got {port!r}") from None
        if not 0 < ssh_port < 65536:
            raise ValueError(f"nix-dabei:sshPort must be between 1 and 65535, got {ssh_port}")
        return cls(
            token=config.get("hcloud:token") or None,
            endpoint=config.get("hcloud:endpoint") or None,
            ssh_port=ssh_port,
        )

    def require_token(self) -> str:
        if not self.token:
            raise ValueError("hcloud:token is not set: run `pulumi config set --secret hcloud:token <token>`")
        return self.token
