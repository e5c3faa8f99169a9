"""Every real patch series against its real upstream at the pinned commit, from a local mirror.

Needs DEQFUSION_MIRROR: a folder of clones or snapshots named <name> or <owner>+<repo> (e.g.
/work/.mirror, or clones made with `git clone <url> $DEQFUSION_MIRROR/<name>`). Skips otherwise.

    DEQFUSION_MIRROR=/path/to/mirrors pytest -m mirror tests/test_upstream_mirror.py -v
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deqfusion.upstream.cli import main
from deqfusion.upstream.manifest import load_manifest
from deqfusion.upstream.paths import find_repo_root, series_dir
from deqfusion.upstream.series import read_series
from deqfusion.upstream.sources import MIRROR_ENV, find_in_mirror

pytestmark = [
    pytest.mark.mirror,
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
]
MANIFEST = load_manifest()
GIT_ENTRIES = [e for e in MANIFEST if e.clonable]


def _mirror_for(entry) -> Path:
    env = os.environ.get(MIRROR_ENV)
    if not env:
        pytest.skip(f"set {MIRROR_ENV} to a folder of upstream clones or snapshots to run the real-upstream tests")
    found = find_in_mirror(entry, Path(env))
    if found is None:
        pytest.skip(f"{MIRROR_ENV}={env} holds no clone of {entry.name} ({', '.join(entry.mirror_names[:2])})")
    return found


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=str(cwd), check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DEQFUSION_MANIFEST", raising=False)
    cfg = tmp_path / "gitconfig"
    cfg.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.mark.parametrize("entry", GIT_ENTRIES, ids=lambda e: e.name)
def test_pinned_commit_in_mirror(entry, clean_env, capsys):
    """The mirror has the pin: `check` checks it out (and tries the series, if any) in a temporary clone."""
    mirror = _mirror_for(entry)
    code = main(["check", entry.name, "--source", str(mirror), "--dest", "/nonexistent/never-created"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert entry.short in out


@pytest.mark.parametrize("entry", GIT_ENTRIES, ids=lambda e: e.name)
def test_patch_series_applies_to_real_upstream(entry, clean_env, tmp_path, capsys):
    series = read_series(series_dir(entry, find_repo_root()))
    if not series:
        pytest.skip(f"{entry.name}: no patch series yet ({entry.integration}, status {entry.status})")
    mirror = _mirror_for(entry)
    dest = tmp_path / entry.name
    code = main(["apply", entry.name, "--source", str(mirror), "--dest", str(dest)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _git(dest, "symbolic-ref", "--short", "HEAD") == MANIFEST.branch
    assert _git(dest, "rev-parse", f"HEAD~{len(series)}") == entry.commit
    assert _git(dest, "status", "--porcelain", "--untracked-files=no") == ""
    assert "--3way" not in out, f"{entry.name}: the series needs git am --3way; refresh it against the pin"
    code = main(["apply", entry.name, "--source", str(mirror), "--dest", str(dest)])
    assert code == 0 and "already applied" in capsys.readouterr().out
