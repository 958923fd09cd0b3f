"""Step 1, the image: build the flake's disk image with Nix, compress and hash it once, cache it.

One image serves every host that uses the same flake output. `check` evaluates the output's store path
(no build), so a preview shows `out_path: old => new` when the image would change, and the content address
decides everything downstream: the cache key, what each host has installed, whether a reinstall is due.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from ..imaging import NIX_FEATURES, ImageError, PreparedImage, build_image, find_image_file, prepare_image
from .base import is_unknown

_FLAKE_REF = re.compile(r"^[A-Za-z0-9+._~:/?=&%@-]+$")
_ATTR_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*(\.[A-Za-z_\"][A-Za-z0-9_'.\"-]*)*$")


def _nix_eval_out_path(flake: str, attr: str, nix_args: list[str]) -> tuple[str, str | None]:
    """The output's store path and the Nix system it is built for (its derivation's `system`)."""
    apply = "d: { out = d.outPath; system = d.system or null; }"
    cmd = ["nix", *NIX_FEATURES, "eval", "--json", *nix_args, f"{flake}#{attr}", "--apply", apply]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError:
        raise ValueError("the `nix` command is not installed on the machine running pulumi") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ValueError(f"cannot evaluate {flake}#{attr}: {tail}")
    try:
        found = json.loads(done.stdout)
        return str(found["out"]), found.get("system")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"cannot evaluate {flake}#{attr}: not a derivation: {done.stdout[:200]}") from None


def default_cache_dir() -> Path:
    """Where compressed images are kept between runs, keyed by store path."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nix-dabei" / "images"


def check_image_inputs(news: dict[str, Any]) -> list[CheckFailure]:
    failures = []
    flake, attr, nix_args = news.get("flake"), news.get("attr"), news.get("nix_args") or []
    if not isinstance(flake, str) or not flake or not _FLAKE_REF.match(flake):
        failures.append(CheckFailure("flake", f"expected a flake reference like github:owner/repo, got {flake!r}"))
    if not isinstance(attr, str) or not _ATTR_PATH.match(attr):
        failures.append(
            CheckFailure("attr", f"expected a flake output attribute like packages.x86_64-linux.image, got {attr!r}")
        )
    if not isinstance(nix_args, list) or not all(isinstance(a, str) for a in nix_args):
        failures.append(CheckFailure("nix_args", "expected a list of strings"))
    return failures


def ensure_prepared(image: dict[str, Any]) -> PreparedImage:
    """The compressed image for these outputs, rebuilt from the store path if this machine lacks it."""
    cache_dir = Path(image.get("cache_dir") or default_cache_dir())
    built = image["out_path"]
    if not Path(built).exists():
        built = build_image(image["flake"], image["attr"], nix_args=image.get("nix_args") or [])
    return prepare_image(find_image_file(built), cache_dir)


class ImageProvider(ResourceProvider):
    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        if any(is_unknown(news.get(k)) for k in ("flake", "attr", "nix_args")):
            return CheckResult(news, [])
        failures = check_image_inputs(news)
        if not failures:
            try:
                out_path, built_for = _nix_eval_out_path(news["flake"], news["attr"], news.get("nix_args") or [])
                news = {**news, "out_path": out_path}
            except ValueError as exc:
                failures.append(CheckFailure("attr", str(exc)))
            else:
                wanted = news.get("system")
                if isinstance(wanted, str) and built_for != wanted:
                    hosts = ", ".join(news.get("for_hosts") or []) or "its hosts"
                    failures.append(
                        CheckFailure(
                            "attr",
                            f"{hosts} need an image for {wanted}, but {news['flake']}#{news['attr']} is built "
                            f"for {built_for}: it would not boot there (x86_64 boots by BIOS on CX/CPX/CCX, "
                            f"aarch64 by UEFI on CAX); name the {wanted} image in image.attr ({{system}}) or "
                            f"image.attrs",
                        )
                    )
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        fields = ("flake", "attr", "out_path")
        changed = any(is_unknown(news.get(f)) or olds.get(f) != news.get(f) for f in fields)
        return DiffResult(changes=changed, replaces=[], delete_before_replace=False)

    def _build(self, props: dict[str, Any]) -> dict[str, Any]:
        nix_args = props.get("nix_args") or []
        pulumi.log.info(f"image: building {props['flake']}#{props['attr']}")
        cache_dir = Path(props.get("cache_dir") or default_cache_dir())
        try:
            out_path = build_image(props["flake"], props["attr"], nix_args=nix_args)
            prepared = prepare_image(find_image_file(out_path), cache_dir)
        except ImageError as exc:
            raise ImageError(f"image {props['flake']}#{props['attr']}: {exc}") from None
        pulumi.log.info(f"image: {out_path}: {prepared.raw_size} bytes, {prepared.compressed_size} compressed (zstd)")
        return {
            **{k: v for k, v in props.items() if k != "__provider"},
            "out_path": out_path,
            "cache_dir": str(cache_dir),
            **prepared.to_json(),
        }

    def create(self, props: dict[str, Any]) -> CreateResult:
        return CreateResult(f"image-{uuid.uuid4().hex[:12]}", self._build(props))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(self._build(news))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        # Refresh re-checks the cache; a missing or damaged entry is rebuilt on the next install.
        cached = Path(str(props.get("compressed_path") or ""))
        outs = dict(props)
        if not cached.is_file() or cached.stat().st_size != int(props.get("compressed_size") or -1):
            outs["compressed_path"] = None
        return ReadResult(id_, outs)


class Image(pulumi.dynamic.Resource):
    flake: pulumi.Output[str]
    attr: pulumi.Output[str]
    nix_args: pulumi.Output[list[str]]
    cache_dir: pulumi.Output[str]
    out_path: pulumi.Output[str]
    raw_size: pulumi.Output[int]
    compressed_path: pulumi.Output[str]
    compressed_size: pulumi.Output[int]
    compressed_sha256: pulumi.Output[str]
    seed_offset: pulumi.Output[int]
    seed_size: pulumi.Output[int]
    system: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        flake: pulumi.Input[str],
        attr: pulumi.Input[str],
        nix_args: pulumi.Input[list[str]] | None = None,
        cache_dir: pulumi.Input[str] | None = None,
        system: str | None = None,
        for_hosts: list[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        props = {
            # The Nix system the hosts using this image need (checked against the output's), and those
            # hosts, named in the refusal.
            "system": system,
            "for_hosts": for_hosts or [],
            "flake": flake,
            "attr": attr,
            "nix_args": nix_args or [],
            "cache_dir": cache_dir,
            "out_path": None,
            "raw_size": None,
            "compressed_path": None,
            "compressed_size": None,
            "compressed_sha256": None,
            "seed_offset": None,
            "seed_size": None,
        }
        super().__init__(ImageProvider(), name, props, opts)
