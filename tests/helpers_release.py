"""A checkout of the authors' release (github.com/jinhong-ni/DEQFusion) for the tests that compare with it.

The release's three module files are read from the mirror snapshot CI already has
(`$DEQFUSION_MIRROR/jinhong-ni+DEQFusion/repo`, a bare-ish git directory) at a pinned commit and
written to a folder outside the project (a temporary one): nothing of the release enters the
repository. `.ci/run` calls this file to set DEQFUSION_OFFICIAL; the tests call `release_checkout`.

    python tests/helpers_release.py DEST     # writes the files to DEST, prints DEST
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

MIRROR_NAME = "jinhong-ni+DEQFusion"
PIN = "b8c1d0fe44bee60264e237af08fe6d35e8ba8f2f"      # the release's HEAD ("Update README.md", 2023)
FILES = ("DEQ_fusion.py", "solver.py", "jacobian.py")


def mirror_repo(mirror: Optional[str] = None) -> Optional[Path]:
    """The release's git directory under DEQFUSION_MIRROR, or None where the mirror lacks it."""
    root = mirror or os.environ.get("DEQFUSION_MIRROR")
    if not root:
        return None
    repo = Path(root) / MIRROR_NAME / "repo"
    return repo if repo.is_dir() else None


def release_checkout(dest: Path, mirror: Optional[str] = None) -> Path:
    """Write the release's DEQ_fusion.py, solver.py and jacobian.py at PIN to `dest` (made if
    missing) from the mirror; raises FileNotFoundError naming what is missing."""
    repo = mirror_repo(mirror)
    if repo is None:
        raise FileNotFoundError(f"no {MIRROR_NAME}/repo under DEQFUSION_MIRROR="
                                f"{mirror or os.environ.get('DEQFUSION_MIRROR')!r}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        # `git show`, not `git archive`/checkout: the snapshot lacks its large data files
        proc = subprocess.run(["git", "-C", str(repo), "show", f"{PIN}:{name}"], capture_output=True)
        if proc.returncode != 0:
            raise FileNotFoundError(f"{repo} has no {name} at {PIN[:7]}: {proc.stderr.decode().strip()}")
        (dest / name).write_bytes(proc.stdout)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/helpers_release.py DEST")
    print(release_checkout(Path(sys.argv[1])))
