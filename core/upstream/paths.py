"""Where things live: the repository root, an upstream's clone folder and its patch series folder.

`clone_dir` is the one answer to "where is the clone of upstream NAME": the patch tool makes clones
there and every runner looks there, whatever the install kind (editable or not).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .manifest import Upstream

ROOT_ENV = "DEQFUSION_REPO_ROOT"  # set by apply_patches.sh to the folder it lives in
CLONES_ENV = "DEQFUSION_CLONES"  # a folder holding the clones as <name>/ (default: the checkout's third_party/)


def _is_repo_root(folder: Path) -> bool:
    return (folder / "apply_patches.sh").is_file() and (folder / "core" / "upstream").is_dir()


def find_repo_root(cwd: Optional[Path] = None) -> Optional[Path]:
    """The deqfusion checkout: $DEQFUSION_REPO_ROOT, the checkout this module runs from
    (an editable install), or the nearest checkout above the working directory; None outside one."""
    env = os.environ.get(ROOT_ENV)
    if env and _is_repo_root(Path(env)):
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    start = (cwd or Path.cwd()).resolve()
    for folder in (here, start, *start.parents):
        if _is_repo_root(folder):
            return folder
    return None


def default_dest(entry: Upstream, root: Optional[Path], cwd: Optional[Path] = None) -> Path:
    """$DEQFUSION_CLONES/<name>, else third_party/<name> under the checkout, or under the working
    directory outside one."""
    env = os.environ.get(CLONES_ENV)
    if env:
        return Path(env).expanduser().resolve() / entry.name
    base = root if root is not None else (cwd or Path.cwd())
    return base / "third_party" / entry.name


def clone_dir(name: str, explicit: Optional[Path] = None) -> Path:
    """Where the clone of upstream `name` is (or will be): `explicit` (--dest / --upstream), else
    the patch tool's default (`default_dest`). Runners and `./apply_patches.sh` share this answer."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    from .manifest import load_manifest

    return default_dest(load_manifest().get(name), find_repo_root()).resolve()


def series_dir(entry: Upstream, root: Optional[Path], override: Optional[str] = None) -> Optional[Path]:
    """The folder of the patch series: --patches, else the manifest's path under the checkout.
    None when the manifest path is relative and there is no checkout to resolve it against."""
    if override:
        return Path(override).expanduser().resolve()
    if not entry.patches:
        return None
    path = Path(entry.patches).expanduser()
    if path.is_absolute():
        return path
    return (root / path) if root is not None else None
