"""Where a clone comes from: --source PATH, a local mirror ($DEQFUSION_MIRROR), or the upstream's URL.

DEQFUSION_MIRROR is either one repository (a clone, or a bare snapshot) or a folder of them named
`<name>`, `<owner>+<repo>` or `<repo>` (optionally with `.git`); inside each, the repository may
also sit in a `repo/` subfolder, as the snapshots of /work/.mirror do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import EXIT_USAGE, UpstreamError
from .manifest import Upstream

MIRROR_ENV = "DEQFUSION_MIRROR"


@dataclass(frozen=True)
class Source:
    location: str  # a path or a URL, as given to `git clone`
    kind: str      # "path" (--source), "mirror" ($DEQFUSION_MIRROR) or "url"

    @property
    def is_local(self) -> bool:
        return self.kind != "url"

    def describe(self) -> str:
        return {"path": "--source", "mirror": MIRROR_ENV, "url": "URL"}[self.kind] + f" {self.location}"


def is_git_repository(path: Path) -> bool:
    """A work tree with .git (folder or file) or a bare repository."""
    if not path.is_dir():
        return False
    if (path / ".git").exists():
        return True
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def _repository_in(folder: Path) -> Optional[Path]:
    for candidate in (folder, folder / "repo", folder / "repo.git"):
        if is_git_repository(candidate):
            return candidate
    return None


def mirror_candidates(entry: Upstream, mirror: Path) -> List[Path]:
    return [mirror / name for name in entry.mirror_names]


def find_in_mirror(entry: Upstream, mirror: Path) -> Optional[Path]:
    """The repository for `entry` in a mirror folder (or the mirror itself if it is one repository)."""
    if is_git_repository(mirror):
        return mirror
    for folder in mirror_candidates(entry, mirror):
        found = _repository_in(folder)
        if found is not None:
            return found
    return None


def resolve_source(entry: Upstream, explicit: Optional[str] = None) -> Source:
    """--source wins, then $DEQFUSION_MIRROR, then the URL. A named source that is not usable is an
    error, never a silent fallback to the network."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise UpstreamError(f"--source {explicit} does not exist: give the path of a clone of {entry.url}",
                                code=EXIT_USAGE)
        if not is_git_repository(path):
            raise UpstreamError(f"--source {explicit} is not a git repository: give a clone (or bare mirror) of {entry.url}",
                                code=EXIT_USAGE)
        return Source(str(path.resolve()), "path")
    env = os.environ.get(MIRROR_ENV)
    if env:
        mirror = Path(env).expanduser()
        if not mirror.is_dir():
            raise UpstreamError(
                f"{MIRROR_ENV}={env} is not a folder: point it at a folder of clones named {entry.name} or "
                f"{entry.mirror_names[1] if len(entry.mirror_names) > 1 else entry.name}, or unset it to clone from {entry.url}",
                code=EXIT_USAGE,
            )
        found = find_in_mirror(entry, mirror)
        if found is None:
            looked = ", ".join(entry.mirror_names[:2])
            raise UpstreamError(
                f"{MIRROR_ENV}={env} holds no clone of {entry.name} (looked for {looked}): add one "
                f"(git clone {entry.url} {mirror / entry.name}), pass --source PATH, or unset {MIRROR_ENV}",
                code=EXIT_USAGE,
            )
        return Source(str(found.resolve()), "mirror")
    return Source(entry.url, "url")
