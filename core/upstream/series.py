"""A patch series: the `*.patch` files of one folder, applied in file-name order (0001-..., 0002-...)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
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


def replace_series(folder: Path, new_files: Sequence[Path], backups: Path) -> Tuple[List[Path], List[Path], Optional[Path]]:
    """Make `folder`'s *.patch files exactly `new_files` (copied in); other files there are kept.

    The series it replaces is first copied to a new folder under `backups` and verified byte for byte (it may hold
    uncommitted work); each new file is written beside its target and renamed into place; on any
    failure the old series is put back. Returns (written, removed, the backup folder or None if
    nothing had to be replaced)."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f.name for f in new_files}
    old = sorted(folder.glob("*.patch"))
    removed = [p for p in old if p.name not in keep]
    new_bytes = {src.name: src.read_bytes() for src in new_files}
    touched = [p for p in old if p.name not in new_bytes or p.read_bytes() != new_bytes[p.name]]
    saved: Optional[Path] = None
    if touched:
        backups.mkdir(parents=True, exist_ok=True)
        saved = Path(tempfile.mkdtemp(prefix=time.strftime("series-%Y%m%d-%H%M%S-"), dir=str(backups)))
        for p in old:
            shutil.copy2(p, saved / p.name)
            if (saved / p.name).read_bytes() != p.read_bytes():
                raise OSError(f"the copy of {p} in {saved} does not match it; nothing was changed")
    written: List[Path] = []
    try:
        for name, data in new_bytes.items():
            dst = folder / name
            tmp = dst.with_name(f".{name}.deqfusion-tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
            written.append(dst)
        for p in removed:
            p.unlink()
    except BaseException:
        for name in new_bytes:
            (folder / f".{name}.deqfusion-tmp").unlink(missing_ok=True)
        for dst in written:
            if saved is None or not (saved / dst.name).exists():
                dst.unlink(missing_ok=True)
        if saved is not None:
            for p in saved.glob("*.patch"):
                shutil.copy2(p, folder / p.name)
        raise
    return written, removed, saved
