"""The upstream manifest (upstreams.toml): read it, check it, look entries up.

The packaged manifest sits next to this module. Tests and developers point elsewhere with
`--manifest PATH` or the environment variable DEQFUSION_MANIFEST.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .errors import EXIT_USAGE, UpstreamError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

MANIFEST_ENV = "DEQFUSION_MANIFEST"
PACKAGED_MANIFEST = Path(__file__).with_name("upstreams.toml")

STATUSES = ("ready", "planned")
SOURCES = ("git", "pip")
INTEGRATIONS = ("patch", "plugin")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Upstream:
    """One `[upstreams.<name>]` table of the manifest."""

    name: str
    status: str
    source: str
    integration: str
    train: str
    license: str
    title: str = ""
    repo: str = ""
    url: str = ""
    commit: str = ""
    license_note: str = ""
    patches: str = ""
    adapter: str = ""
    docker: str = ""
    runner: str = ""
    package: str = ""
    notes: str = ""

    @property
    def short(self) -> str:
        """The pinned commit, abbreviated for messages."""
        return self.commit[:10]

    @property
    def mirror_names(self) -> List[str]:
        """Folder names under DEQFUSION_MIRROR that may hold this upstream's clone."""
        names = [self.name]
        if self.repo:
            owner, _, repo = self.repo.partition("/")
            names += [f"{owner}+{repo}", repo, f"{repo}.git"]
        names.append(f"{self.name}.git")
        unique: List[str] = []
        for n in names:
            if n not in unique:
                unique.append(n)
        return unique

    @property
    def clonable(self) -> bool:
        return self.source == "git"


_REQUIRED = {"status", "source", "integration", "train", "license"}
_REQUIRED_GIT = {"url", "commit"}
_KNOWN = {f.name for f in fields(Upstream)} - {"name"}


@dataclass
class Manifest:
    path: Path
    branch: str
    upstreams: Dict[str, Upstream] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.upstreams.values())

    @property
    def names(self) -> List[str]:
        return list(self.upstreams)

    def get(self, name: str) -> Upstream:
        try:
            return self.upstreams[name]
        except KeyError:
            raise UpstreamError(
                f"unknown upstream {name!r}; known: {', '.join(self.names)} (see `./apply_patches.sh list`)",
                code=EXIT_USAGE,
            ) from None


def manifest_path(explicit: Optional[str] = None) -> Path:
    """--manifest, else $DEQFUSION_MANIFEST, else the packaged upstreams.toml."""
    chosen = explicit or os.environ.get(MANIFEST_ENV)
    return Path(chosen).expanduser() if chosen else PACKAGED_MANIFEST


def load_manifest(explicit: Optional[str] = None) -> Manifest:
    path = manifest_path(explicit)
    origin = "--manifest" if explicit else (MANIFEST_ENV if os.environ.get(MANIFEST_ENV) else "packaged manifest")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UpstreamError(
            f"manifest {path} ({origin}) does not exist: fix the path, or unset {MANIFEST_ENV} to use the packaged one",
            code=EXIT_USAGE,
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UpstreamError(f"manifest {path} is not valid TOML: {err}", code=EXIT_USAGE) from None
    return parse_manifest(data, path)


def parse_manifest(data: dict, path: Path) -> Manifest:
    def bad(msg: str) -> UpstreamError:
        return UpstreamError(f"manifest {path}: {msg}", code=EXIT_USAGE)

    if data.get("schema", 1) != 1:
        raise bad(f"schema {data.get('schema')!r} is not supported (this deqfusion reads schema 1)")
    branch = data.get("branch", "deqfusion")
    if not isinstance(branch, str) or not branch:
        raise bad("`branch` must be a non-empty string")
    tables = data.get("upstreams")
    if not isinstance(tables, dict) or not tables:
        raise bad("no [upstreams.<name>] tables")
    manifest = Manifest(path=path, branch=branch)
    for name, table in tables.items():
        manifest.upstreams[name] = _parse_entry(name, table, bad)
    return manifest


def _parse_entry(name: str, table: object, bad) -> Upstream:
    if not _NAME.match(name):
        raise bad(f"upstream name {name!r} must be lower-case letters, digits and _")
    if not isinstance(table, dict):
        raise bad(f"[upstreams.{name}] must be a table")
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise bad(f"[upstreams.{name}] has unknown keys {unknown}; known keys: {sorted(_KNOWN)}")
    missing = sorted(_REQUIRED - set(table))
    if table.get("source") == "git":
        missing += sorted(_REQUIRED_GIT - set(table))
    if table.get("source") == "pip" and "package" not in table:
        missing.append("package")
    if missing:
        raise bad(f"[upstreams.{name}] lacks {missing}")
    for key, value in table.items():
        if not isinstance(value, str):
            raise bad(f"[upstreams.{name}] {key} must be a string")
    for key, allowed in (("status", STATUSES), ("source", SOURCES), ("integration", INTEGRATIONS)):
        if table[key] not in allowed:
            raise bad(f"[upstreams.{name}] {key} = {table[key]!r}; expected one of {list(allowed)}")
    if table.get("commit") and not _SHA.match(table["commit"]):
        raise bad(f"[upstreams.{name}] commit must be a full 40-hex-digit SHA, not {table['commit']!r}")
    return Upstream(name=name, **table)
