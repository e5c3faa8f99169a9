"""A patch series: the `*.patch` files of one folder, applied in file-name order (0001-..., 0002-...)."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Patch:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def read_series(folder: Optional[Path]) -> List[Patch]:
    """The series in `folder`; empty when the folder does not exist (no patches yet)."""
    if folder is None or not folder.is_dir():
        return []
    return [Patch(p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.glob("*.patch"))]


def fingerprint(series: Sequence[Patch]) -> List[Tuple[str, str]]:
    """What identifies a series: its file names and contents."""
    return [(p.name, p.sha256) for p in series]


def replace_series(folder: Path, new_files: Sequence[Path]) -> Tuple[List[Path], List[Path]]:
    """Make `folder`'s *.patch files exactly `new_files` (copied in); other files there are kept.
    Returns (written, removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f.name for f in new_files}
    removed = [p for p in sorted(folder.glob("*.patch")) if p.name not in keep]
    for p in removed:
        p.unlink()
    written = []
    for src in new_files:
        dst = folder / src.name
        shutil.copyfile(src, dst)
        written.append(dst)
    return written, removed
