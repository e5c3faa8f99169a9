"""Fixtures shared by the tests of the patch tool: a fake upstream made of real git repositories."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from upstream_fake import Fake, git, isolated_env, make_fake

from deqfusion.upstream.cli import main


@pytest.fixture(scope="session")
def _fake_template(tmp_path_factory) -> Path:
    """Build the fake upstream once per module; each test gets its own copy."""
    base = tmp_path_factory.mktemp("fake-template")
    env = isolated_env(base / "home")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        make_fake(base / "fake")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return base


@pytest.fixture
def fake(_fake_template, tmp_path, monkeypatch) -> Fake:
    shutil.copytree(_fake_template / "fake", tmp_path / "fake", symlinks=True)
    for k, v in isolated_env(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    for k in ("DEQFUSION_MIRROR", "DEQFUSION_MANIFEST", "DEQFUSION_REPO_ROOT"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "fake"
    manifest = root / "manifest.toml"
    # the template's manifest names the template's patch folder: point it at this copy
    manifest.write_text(manifest.read_text().replace(str(_fake_template / "fake"), str(root)))
    up = root / "up"
    return Fake(root, up, root / "mirror", root / "old", git(up, "rev-parse", "main~1"),
                git(up, "rev-parse", "main~2"), git(up, "rev-parse", "main"), root / "patches" / "good",
                root / "patches" / "bad", root / "patches" / "three", manifest)


@pytest.fixture
def run(fake, capsys):
    """Run `apply_patches.sh ARGS` in-process with the fake manifest; returns (code, stdout, stderr)."""
    def _run(*args: str):
        code = main([*args, "--manifest", str(fake.manifest)])
        out, err = capsys.readouterr()
        return code, out, err
    return _run
