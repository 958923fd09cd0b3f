"""Host flakes on the deployer: locked, their systems evaluated, their sources sent to the hosts.

Every host flake is locked where `pulumi` runs (`nix flake metadata --json`, with the user's own
credentials for private repositories), so every host of one `up` builds the same source and a moved branch
or an edited local file shows in the preview. The locked source (the store path Nix fetched it to) is sent
to each host that acts, which then builds exactly that source: `path:/var/lib/nix-dabei/flakes/<id>` with
its `narHash`. Local flakes (`.`, `./infra`, `/abs`, `path:`, `git+file:`) resolve against the Pulumi
project's directory. With evaluation on, each host's `nixosConfigurations.<name>.config.system.build.toplevel`
store path is evaluated in one `nix eval` for the whole fleet.

A flake's own inputs are fetched by the host from their locked URLs, except those it cannot fetch: with
`send_inputs="local"` (the default) the inputs only this machine reaches (local paths and files, git over
SSH with the user's keys), with `"all"` every input (private `github:` repositories look like public ones).
Their store paths are sent to the host's Nix store before the source (`nix-dabei receive --inputs`); a
locked input already in the store is used as it is, which is what `nix flake archive --to` relies on (Nix
manual, `nix flake archive`: "Upload all flake inputs to a different machine for remote evaluation").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from .imaging import NIX_FEATURES

# Where a host keeps the sources it was sent (the first-boot program's `receive` writes there).
HOST_FLAKES_DIR = "/var/lib/nix-dabei/flakes"
_NIX_SECONDS = 600
TOPLEVEL = "config.system.build.toplevel"
# Which of a flake's inputs the deployer sends (the rest the host fetches itself).
SEND_INPUTS = ("local", "all")


class FlakeError(Exception):
    """A flake could not be locked or evaluated; the text names the flake and Nix's error."""


@dataclass(frozen=True)
class LockedFlake:
    """One host flake as locked on the deployer.

    `url`: Nix's locked URL (a `rev` for git, a `narHash` for paths), shown to reviewers; `nar_hash`: the
    source's content hash; `path`: the store path of the source on the deployer (what is sent); `inputs`:
    the store paths of the inputs sent with it, sorted (see the module docstring); `directory`: where a
    local flake is on the deployer ("" for others), for error hints only."""

    url: str
    nar_hash: str
    path: str
    inputs: tuple[str, ...] = ()
    directory: str = ""

    @property
    def source_id(self) -> str:
        """The directory name of this source on a host: the same content, the same name."""
        return hashlib.sha256(self.nar_hash.encode()).hexdigest()[:32]

    @property
    def host_ref(self) -> str:
        """The flake reference a host builds: the sent source, pinned to its content hash."""
        return pinned(f"{HOST_FLAKES_DIR}/{self.source_id}", self.nar_hash)

    @property
    def pinned_ref(self) -> str:
        """The source on the deployer, pinned to its content: what `nix` here reads it as."""
        return pinned(self.path, self.nar_hash)

    def to_json(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "url": self.url,
            "nar_hash": self.nar_hash,
            "path": self.path,
            "host_ref": self.host_ref,
        }
        if self.inputs:  # absent when none: sources recorded by earlier releases compare equal
            wire["inputs"] = list(self.inputs)
        return wire


def pinned(path: str, nar_hash: str) -> str:
    """`path:<path>?narHash=<hash>`: a flake directory pinned to its content."""
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


def lock(
    ref: str, base_dir: str, nix_args: list[str] | tuple[str, ...] = (), send_inputs: str = "local"
) -> LockedFlake:
    """Lock `ref` (relative paths against `base_dir`): `nix flake metadata --json`, which also fetches the
    source into the deployer's store, and find the inputs to send (`send_inputs`, see the module
    docstring; `nix flake archive --json --dry-run` names their store paths, nothing is fetched). Raises
    FlakeError."""
    cwd, arg, directory = base_dir, ref, None
    # `path:X` and `git+file:X` without a query are directories too (relative ones against `base_dir`).
    plain = not any(c in ref for c in "?#")
    as_path = ref.startswith("path:") and plain
    if is_local_path(ref) or as_path or (ref.startswith("git+file:") and plain):
        where = unquote(ref.removeprefix("path:").removeprefix("git+file:"))
        directory = Path(base_dir, "/" + where.lstrip("/") if where.startswith("//") else where).resolve()
        if not directory.is_dir():
            raise FlakeError(f"{ref!r} is not a directory (resolved against {base_dir}: {directory})")
        if not (directory / "flake.nix").is_file():
            raise FlakeError(f"{directory} holds no flake.nix")
        # `path:` copies the directory as it is; a plain path is read through git inside a repository.
        cwd, arg = (str(directory), "path:.") if as_path else _path_ref(directory)
    try:
        meta = json.loads(_nix(["flake", "metadata", "--json", arg], list(nix_args), cwd))
        url = str(meta["url"])
        if as_path and url.startswith("path:."):  # read as `.` from the directory: name it
            url = f"path:{quote(str(directory))}{url[len('path:.') :]}"
        locked = LockedFlake(
            url=url,
            nar_hash=str(meta["locked"]["narHash"]),
            path=str(meta["path"]),
            directory=str(directory or ""),
        )
    except FlakeError as exc:
        raise FlakeError(f"cannot lock flake {ref!r}: {exc}{untracked_hint(directory)}") from None
    except (ValueError, KeyError, TypeError):
        raise FlakeError(f"cannot lock flake {ref!r}: `nix flake metadata --json` answered no locked source") from None
    if directory is not None and arg.startswith("git+file:") and meta["locked"].get("rev"):
        # Nix locked the last commit although the working tree differs (Nix 2.8 does so for a repository
        # at a path with a space): what the hosts would get is not what the user sees.
        changed = _git_status(directory, untracked=False)
        if changed:
            raise FlakeError(
                f"cannot lock flake {ref!r}: Nix read the last commit of {directory}, not its uncommitted "
                f"changes ({', '.join(changed[:5])}): commit them (this Nix reads a repository at a path "
                f"with a space only as its last commit), or move the project to a path without spaces"
            )
    sent = [node for node in _locked_inputs(meta.get("locks")) if send_inputs == "all" or not fetchable(node[1])]
    if not sent:
        return locked
    try:
        tree = json.loads(_nix(["flake", "archive", "--json", "--dry-run", locked.pinned_ref], list(nix_args), cwd))
    except (FlakeError, ValueError) as exc:
        raise FlakeError(f"cannot list the inputs of flake {ref!r}: {exc}") from None
    paths = _archive_paths(tree)
    missing = [" / ".join(names) for names, _ in sent if names not in paths]
    if missing:
        raise FlakeError(f"cannot find the store paths of the inputs {', '.join(missing)} of flake {ref!r}")
    return dataclasses.replace(locked, inputs=tuple(sorted({paths[names] for names, _ in sent})))


InputPath = tuple[str, ...]


def fetchable(locked: dict[str, Any]) -> bool:
    """Whether a host can fetch a locked input itself (a lock file node's `locked`): not a local path or
    file (`path`, `file:` URLs), nor one reached over SSH (`git+ssh`), which needs the user's keys."""
    url = str(locked.get("url") or "")
    return locked.get("type") != "path" and not url.startswith(("file:", "ssh:", "git+ssh:"))


def host_fetches(url: str) -> bool:
    """Whether a locked flake URL is something a host can fetch itself: not a path or file on the deployer."""
    return not url.startswith(("path:", "git+file:", "file:", "tarball+file:", "/"))


def _locked_inputs(locks: Any) -> list[tuple[InputPath, dict[str, Any]]]:
    """Every input of a lock file (`nix flake metadata --json`'s `locks`) that is a node of its own, by its
    path of input names from the root (as `nix flake archive` nests them; `follows` are skipped there too),
    with its `locked` attributes."""
    if not isinstance(locks, dict) or not isinstance(locks.get("nodes"), dict):
        return []
    nodes: dict[str, Any] = locks["nodes"]
    found: list[tuple[InputPath, dict[str, Any]]] = []

    def walk(key: str, prefix: InputPath, seen: frozenset[str]) -> None:
        for name, target in sorted((nodes.get(key) or {}).get("inputs", {}).items()):
            if not isinstance(target, str) or target in seen:  # a list: `follows`, no node of its own
                continue
            node = nodes.get(target) or {}
            found.append(((*prefix, name), dict(node.get("locked") or {})))
            walk(target, (*prefix, name), seen | {target})

    walk(str(locks.get("root", "root")), (), frozenset())
    return found


def _archive_paths(tree: Any, prefix: InputPath = ()) -> dict[InputPath, str]:
    """{input path: store path} from `nix flake archive --json`'s nested `inputs`."""
    found: dict[InputPath, str] = {}
    for name, entry in ((tree or {}).get("inputs") or {}).items():
        found[(*prefix, name)] = str(entry["path"])
        found.update(_archive_paths(entry, (*prefix, name)))
    return found


def _git_status(directory: Path, untracked: bool) -> list[str]:
    """The files under `directory` that differ from the last commit of its git repository (tracked and
    changed; with `untracked`, only the untracked ones). Empty outside a repository."""
    done = subprocess.run(
        ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=all", "--", "."],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return []
    lines = [line for line in done.stdout.splitlines() if len(line) > 3]
    return [line[3:] for line in lines if line.startswith("??") == untracked]


def untracked_hint(directory: Path | None) -> str:
    """For an error about a flake in a git repository: the untracked files Nix did not read, if any."""
    files = _git_status(directory, untracked=True) if directory is not None else []
    if not files:
        return ""
    return (
        f" (Nix reads a flake in a git repository from its tracked files; not tracked: {', '.join(files[:5])}"
        f"{' …' if len(files) > 5 else ''}: `git add` them)"
    )


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


class Evaluated(NamedTuple):
    """A host's evaluated system: the toplevel's store path and the Nix system it is built for."""

    path: str
    system: str


def evaluate_systems(
    hosts: dict[str, LockedFlake], base_dir: str, nix_args: list[str] | tuple[str, ...] = ()
) -> dict[str, Evaluated]:
    """Each host's `nixosConfigurations.<name>.config.system.build.toplevel`: its store path and the
    system it is built for, from the source it will be sent (so the path is the one the host builds), in
    one `nix eval` for the whole fleet. Nothing is built. Raises FlakeError naming the hosts when the
    evaluation fails."""
    if not hosts:
        return {}
    flakes = {locked.path: locked for locked in hosts.values()}
    bindings = "; ".join(
        f"f{i} = builtins.getFlake {_nix_string(pinned(p, f.nar_hash))}" for i, (p, f) in enumerate(flakes.items())
    )
    index = {p: i for i, p in enumerate(flakes)}
    attrs = " ".join(
        f"{_nix_string(name)} = let t = f{index[locked.path]}.nixosConfigurations.{_nix_string(name)}.{TOPLEVEL}; "
        f"in {{ path = t.outPath; system = t.system or null; }};"
        for name, locked in sorted(hosts.items())
    )
    try:
        out = _nix(["eval", "--json", "--expr", f"let {bindings}; in {{ {attrs} }}"], list(nix_args), base_dir)
        systems = json.loads(out)
    except FlakeError as exc:
        raise FlakeError(f"cannot evaluate the systems of {', '.join(sorted(hosts))}: {exc}") from None
    return {name: Evaluated(str(systems[name]["path"]), str(systems[name]["system"] or "")) for name in hosts}


def project_dir() -> str:
    """The Pulumi project's directory (where `Pulumi.yaml` is), which relative flake paths are taken from."""
    import pulumi

    try:
        root = pulumi.get_root_directory()
    except Exception:  # older SDKs, mocks: the program runs in the project's directory
        root = ""
    return root if root and Path(root).is_dir() else os.getcwd()


_EXPORTS: dict[tuple[str, ...], bytes] = {}
_EXPORTS_LOCK = threading.Lock()


def export_inputs(paths: list[str] | tuple[str, ...], pinned_ref: str) -> bytes:
    """The inputs' store paths as one zstd-compressed `nix-store --export` stream, made once per set of
    paths (every host that lacks them gets the same bytes). `nix flake archive` first fetches any the
    deployer's store lacks, with the user's credentials. Raises FlakeError."""
    key = tuple(sorted(paths))
    with _EXPORTS_LOCK:
        if key not in _EXPORTS:
            try:
                _nix(["flake", "archive", pinned_ref], [], os.getcwd())
            except FlakeError as exc:
                raise FlakeError(f"cannot fetch the inputs of {pinned_ref}: {exc}") from None
            export = subprocess.Popen(["nix-store", "--export", *key], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert export.stdout is not None
            try:
                compressed = subprocess.run(["zstd", "-c", "-q", "-T0"], stdin=export.stdout, capture_output=True)
            finally:
                export.stdout.close()
                exported = export.wait()
            if exported != 0 or compressed.returncode != 0:
                assert export.stderr is not None
                why = export.stderr.read().decode(errors="replace").strip() or compressed.stderr.decode().strip()
                raise FlakeError(f"cannot export the flake inputs {' '.join(key)}: {why[-500:]}")
            _EXPORTS[key] = compressed.stdout
        return _EXPORTS[key]
