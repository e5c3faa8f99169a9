"""The command line as a user runs it: ./apply_patches.sh, python -m deqfusion.upstream, deqfusion."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from upstream_fake import git, isolated_env, make_fake

from deqfusion.upstream.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "apply_patches.sh"
NAMES = ["mmdynamics", "multibench", "cmbert", "imvotenet", "mcan", "mutan", "mmdet3d"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEQFUSION_MIRROR", "DEQFUSION_MANIFEST", "DEQFUSION_REPO_ROOT", "DEQFUSION_PROG")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _sh(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=str(cwd), env=_env(**env), capture_output=True, text=True,
                          timeout=120)


@needs_bash
def test_help():
    res = _sh("--help")
    assert res.returncode == 0, res.stderr
    for word in ("list", "status", "apply", "check", "revert", "refresh", "DEQFUSION_MIRROR", "apply_patches.sh"):
        assert word in res.stdout


@needs_bash
def test_list_names_every_upstream(tmp_path):
    res = _sh("list", cwd=tmp_path)                                   # works from any folder
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()[1:-1]]
    assert names == NAMES
    assert "TencentAILabHealthcare/mmdynamics@7f04084daa" in res.stdout


@needs_bash
def test_unknown_name_is_one_line_error():
    res = _sh("nosuch")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("apply_patches.sh: error: unknown upstream 'nosuch'")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


@needs_bash
def test_package_not_importable_says_how_to_install(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    res = _sh("list", PYTHON=str(fake_python))
    assert res.returncode == 3
    assert "pip install -e ." in res.stderr and "not importable" in res.stderr


@needs_bash
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_apply_shortcut_end_to_end(tmp_path):
    env = isolated_env(tmp_path / "home")
    os.environ.update(env)  # make_fake runs git with the process environment
    try:
        fake = make_fake(tmp_path / "fake")
    finally:
        for k in env:
            os.environ.pop(k, None)
    dest = tmp_path / "clone"
    common = ("--manifest", str(fake.manifest), "--dest", str(dest))
    res = _sh("fake", "--source", str(fake.up), *common, **env)      # ./apply_patches.sh NAME == apply NAME
    assert res.returncode == 0, res.stderr
    assert "applied 2 patches" in res.stdout and "next: cd" in res.stdout
    assert git(dest, "rev-parse", "HEAD~2") == fake.pinned
    res = _sh("fake", *common, **env)
    assert res.returncode == 0 and "already applied" in res.stdout


def test_python_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "deqfusion.upstream", "list"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(name in res.stdout for name in NAMES)


def test_registered_in_deqfusion_cli(capsys):
    import argparse

    from deqfusion.upstream import cli

    parser = argparse.ArgumentParser(prog="deqfusion")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["list"])
    assert args.func(args) == 0
    assert "mmdynamics" in capsys.readouterr().out
    args = parser.parse_args(["apply", "nosuch"])
    assert args.func(args) == 2
    assert capsys.readouterr().err.startswith("deqfusion: error: unknown upstream")
    args = parser.parse_args(["upstream", "status", "mmdynamics", "--dest", "/nonexistent/x"])
    assert args.func(args) == 0
    assert "not cloned" in capsys.readouterr().out


def test_deqfusion_main_dispatches(capsys):
    from deqfusion.cli import main

    assert main(["list"]) == 0
    assert "imvotenet" in capsys.readouterr().out


def test_manifest_env_var(tmp_path, monkeypatch, capsys):
    from deqfusion.upstream.cli import main

    other = tmp_path / "m.toml"
    other.write_text('[upstreams.solo]\nstatus = "planned"\nsource = "pip"\nintegration = "plugin"\n'
                     'package = "solo==1"\nlicense = "MIT"\ntrain = "solo"\n')
    monkeypatch.setenv("DEQFUSION_MANIFEST", str(other))
    assert load_manifest().names == ["solo"]
    assert main(["list"]) == 0
    assert "solo" in capsys.readouterr().out
    monkeypatch.setenv("DEQFUSION_MANIFEST", str(tmp_path / "missing.toml"))
    assert main(["list"]) == 2
    assert "DEQFUSION_MANIFEST" in capsys.readouterr().err
