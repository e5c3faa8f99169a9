"""What the real-upstream tests share: the mirror clone of an upstream at its pin, and a checked git call."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from deqfusion.upstream.manifest import load_manifest
from deqfusion.upstream.sources import MIRROR_ENV, find_in_mirror


def mirror_clone(name: str, pin: Optional[str] = None) -> Path:
    """The clone of upstream `name` in $DEQFUSION_MIRROR (found as the patch tool finds it), holding
    `pin` where given; the test skips, saying what is missing, where there is none."""
    entry = load_manifest().get(name)
    env = os.environ.get(MIRROR_ENV)
    if not env:
        pytest.skip(f"no mirror of {entry.repo}: set {MIRROR_ENV} to a clone or a folder of clones")
    found = find_in_mirror(entry, Path(env).expanduser())
    if found is None:
        pytest.skip(f"{MIRROR_ENV}={env} holds no clone of {entry.repo}")
    if pin is not None:
        ok = subprocess.run(["git", "-C", str(found), "cat-file", "-e", pin + "^{commit}"], capture_output=True)
        if ok.returncode != 0:
            pytest.skip(f"{MIRROR_ENV}={env}: the clone of {entry.repo} lacks commit {pin[:7]}")
    return Path(found)


def git(cwd: Path, *args: str) -> str:
    """git in `cwd`; a failure fails the test with git's message."""
    out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    assert out.returncode == 0, f"git {' '.join(args)} failed: {out.stderr}"
    return out.stdout
