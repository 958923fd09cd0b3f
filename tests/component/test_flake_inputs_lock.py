"""Which inputs of a host flake the deployer sends (flakes.fetchable, the lock file walk), on real lock files."""

from __future__ import annotations

import pytest

from dabei_component import flakes


@pytest.mark.parametrize(
    ("locked", "host_fetches"),
    [
        ({"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "a" * 40}, True),
        ({"type": "gitlab", "owner": "me", "repo": "infra", "rev": "a" * 40}, True),
        ({"type": "git", "url": "https://git.example.org/infra.git", "rev": "a" * 40}, True),
        ({"type": "tarball", "url": "https://example.org/src.tar.gz"}, True),
        ({"type": "path", "path": "/home/me/common"}, False),
        ({"type": "git", "url": "file:///home/me/common", "rev": "a" * 40}, False),
        ({"type": "tarball", "url": "file:///home/me/src.tar.gz"}, False),
        ({"type": "git", "url": "ssh://git@github.com/me/secrets.git", "rev": "a" * 40}, False),
        ({"type": "mercurial", "url": "ssh://hg@example.org/repo", "rev": "a" * 40}, False),
    ],
)
def test_a_host_fetches_public_urls_itself_not_local_or_ssh_ones(locked: dict, host_fetches: bool) -> None:
    assert flakes.fetchable(locked) is host_fetches


def test_the_lock_walk_names_nested_inputs_by_their_path_and_skips_follows() -> None:
    locks = {
        "root": "root",
        "version": 7,
        "nodes": {
            "root": {"inputs": {"nixpkgs": "nixpkgs", "agenix": "agenix", "common": "common"}},
            "nixpkgs": {"locked": {"type": "github", "owner": "NixOS", "repo": "nixpkgs"}},
            "agenix": {"inputs": {"nixpkgs": ["nixpkgs"], "darwin": "darwin"}, "locked": {"type": "github"}},
            "darwin": {"locked": {"type": "github", "owner": "lnl7"}},
            "common": {"locked": {"type": "path", "path": "/home/me/common"}},
        },
    }
    walked = flakes._locked_inputs(locks)
    assert [names for names, _ in walked] == [("agenix",), ("agenix", "darwin"), ("common",), ("nixpkgs",)]
    assert [names for names, locked in walked if not flakes.fetchable(locked)] == [("common",)]
    assert flakes._locked_inputs({"root": "root", "nodes": {"root": {}}, "version": 7}) == []
    assert flakes._locked_inputs(None) == []
