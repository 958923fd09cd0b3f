"""Host flakes on the deployer: locked, their systems evaluated, their sources sent to the hosts.

Every host flake is locked where `pulumi` runs (`nix flake metadata --json`, with the user's own
credentials for private repositories), so every host of one `up` builds the same source and a moved branch
or an edited local file shows in the preview. The locked source (the store path Nix fetched it to) is sent
to each host that acts, which then builds exactly that source: `path:/var/lib/nix-dabei/flakes/<id>` with
its `narHash`. Local flakes (`.`, `./infra`, `/abs`, `path:`, `git+file:`) resolve against the Pulumi
project's directory. With evaluation on, each host's `nixosConfigurations.<name>.config.system.build.toplevel`
store path is evaluated in one `nix eval` for the whole fleet.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .imaging import NIX_FEATURES

# Where a host keeps the sources it was sent (the first-boot program's `receive` writes there).
HOST_FLAKES_DIR = "/var/lib/nix-dabei/flakes"
_NIX_SECONDS = 600
TOPLEVEL = "config.system.build.toplevel"


class FlakeError(Exception):
    """A flake could not be locked or evaluated; the text names the flake and Nix's error."""


@dataclass(frozen=True)
class LockedFlake:
    """One host flake as locked on the deployer.

    `url`: Nix's locked URL (a `rev` for git, a `narHash` for paths), shown to reviewers; `nar_hash`: the
    source's content hash; `path`: the store path of the source on the deployer (what is sent)."""

    url: str
    nar_hash: str
    path: str

    @property
    def source_id(self) -> str:
        """The directory name of this source on a host: the same content, the same name."""
        return hashlib.sha256(self.nar_hash.encode()).hexdigest()[:32]

    @property
    def host_ref(self) -> str:
        """The flake reference a host builds: the sent source, pinned to its content hash."""
        return _pinned(f"{HOST_FLAKES_DIR}/{self.source_id}", self.nar_hash)

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "nar_hash": self.nar_hash, "path": self.path, "host_ref": self.host_ref}


def _pinned(path: str, nar_hash: str) -> str:
    return f"path:{path}?narHash={quote(nar_hash, safe='-')}"


def is_local_path(ref: str) -> bool:
    """A flake given as a plain path (`.`, `./infra`, `../x`, `/abs/infra`), not as a URL."""
    return ref.startswith(("/", "./", "../")) or ref in (".", "..")


def _nix(args: list[str], nix_args: list[str], cwd: str) -> str:
    command = ["nix", *NIX_FEATURES, *args, *nix_args]
    if not Path(cwd).is_dir():
        raise FlakeError(f"the directory {cwd} does not exist")
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=_NIX_SECONDS, check=False)
    except FileNotFoundError:
        raise FlakeError("the `nix` command is not installed on the machine running pulumi") from None
    except subprocess.TimeoutExpired:
        raise FlakeError(f"`nix {args[0]}` took longer than {_NIX_SECONDS} s") from None
    if done.returncode != 0:
        # Nix's retry warnings ("warning: error: unable to download ...") say again what its error says.
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("warning:")]
        raise FlakeError("\n".join(lines[-8:]) or f"exit status {done.returncode}")
    return done.stdout


def lock(ref: str, base_dir: str, nix_args: list[str] | tuple[str, ...] = ()) -> LockedFlake:
    """Lock `ref` (relative paths against `base_dir`): `nix flake metadata --json`, which also fetches the
    source into the deployer's store. Raises FlakeError."""
    cwd, arg = base_dir, ref
    if is_local_path(ref):
        directory = Path(base_dir, ref).resolve()
        if not directory.is_dir():
            raise FlakeError(f"{ref!r} is not a directory (resolved against {base_dir}: {directory})")
        if not (directory / "flake.nix").is_file():
            raise FlakeError(f"{directory} holds no flake.nix")
        cwd, arg = _path_ref(directory)
    try:
        meta = json.loads(_nix(["flake", "metadata", "--json", arg], list(nix_args), cwd))
        return LockedFlake(url=str(meta["url"]), nar_hash=str(meta["locked"]["narHash"]), path=str(meta["path"]))
    except FlakeError as exc:
        raise FlakeError(f"cannot lock flake {ref!r}: {exc}") from None
    except (ValueError, KeyError, TypeError):
        raise FlakeError(f"cannot lock flake {ref!r}: `nix flake metadata --json` answered no locked source") from None


def _path_ref(directory: Path) -> tuple[str, str]:
    """How Nix reads a flake directory, as (working directory, reference): through git when it is inside a
    repository (as Nix does for a path: tracked files only, the working tree as it is), else as a path.
    Spelled out because Nix 2.8 refuses a path with a space ("is not a valid URL") unless percent-encoded
    in a `git+file:` URL, or given as `.` from the directory itself."""
    for parent in (directory, *directory.parents):
        if (parent / ".git").exists():
            sub = directory.relative_to(parent).as_posix()
            query = f"?dir={quote(sub)}" if sub != "." else ""
            return str(directory), f"git+file://{quote(str(parent))}{query}"
    return str(directory), "."


def _nix_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def evaluate_systems(
    hosts: dict[str, LockedFlake], base_dir: str, nix_args: list[str] | tuple[str, ...] = ()
) -> dict[str, str]:
    """Each host's `nixosConfigurations.<name>.config.system.build.toplevel` store path, from the source it
    will be sent (so the path is the one the host builds), in one `nix eval` for the whole fleet. Nothing
    is built. Raises FlakeError naming the hosts when the evaluation fails."""
    if not hosts:
        return {}
    flakes = {locked.path: locked for locked in hosts.values()}
    bindings = "; ".join(
        f"f{i} = builtins.getFlake {_nix_string(_pinned(p, f.nar_hash))}" for i, (p, f) in enumerate(flakes.items())
    )
    index = {p: i for i, p in enumerate(flakes)}
    attrs = " ".join(
        f"{_nix_string(name)} = f{index[locked.path]}.nixosConfigurations.{_nix_string(name)}.{TOPLEVEL}.outPath;"
        for name, locked in sorted(hosts.items())
    )
    try:
        out = _nix(["eval", "--json", "--expr", f"let {bindings}; in {{ {attrs} }}"], list(nix_args), base_dir)
        systems = json.loads(out)
    except FlakeError as exc:
        raise FlakeError(f"cannot evaluate the systems of {', '.join(sorted(hosts))}: {exc}") from None
    return {name: str(systems[name]) for name in hosts}


def project_dir() -> str:
    """The Pulumi project's directory (where `Pulumi.yaml` is), which relative flake paths are taken from."""
    import pulumi

    try:
        root = pulumi.get_root_directory()
    except Exception:  # older SDKs, mocks: the program runs in the project's directory
        root = ""
    return root if root and Path(root).is_dir() else os.getcwd()
