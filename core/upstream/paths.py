"""Where things live: the repository root, an upstream's clone folder and its patch series folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .manifest import Upstream

ROOT_ENV = "DEQFUSION_REPO_ROOT"  # set by apply_patches.sh to the folder it lives in


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
    """third_party/<name> under the checkout, or under the working directory outside one."""
    base = root if root is not None else (cwd or Path.cwd())
    return base / "third_party" / entry.name


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
