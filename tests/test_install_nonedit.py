"""A non-editable install (.ci/envs/nonedit.sh) finds the clone that ./apply_patches.sh made.

The patch tool and the runner share one answer to "where is the clone" (deqfusion.upstream.paths.
clone_dir): run from the checkout, both use its third_party/; from anywhere, $DEQFUSION_CLONES.
The package runs from site-packages here, so nothing can come from the checkout by accident.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_envs import env_python

REPO = Path(__file__).resolve().parents[1]
MIRROR = os.environ.get("DEQFUSION_MIRROR")
DATA = os.environ.get("DEQFUSION_DATA")


def _checkout_copy(dest: Path) -> Path:
    """What a user's checkout has that matters here: the wrapper, the patch tool's folder, the series."""
    for rel in ("apply_patches.sh", "core/upstream", "patches/mmdynamics"):
        src = REPO / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / rel)
    return dest


def _run(python: str, args, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DEQFUSION_REPO_ROOT", "DEQFUSION_CLONES",
                                                                      "DEQFUSION_MANIFEST", "PYTHONPATH"))}
    full.update(env)
    full["PATH"] = f"{Path(python).parent}{os.pathsep}{full.get('PATH', '')}"
    return subprocess.run(args, cwd=str(cwd), env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not MIRROR, reason="needs DEQFUSION_MIRROR (a snapshot of MM-Dynamics) to apply the patch")
@pytest.mark.skipif(not DATA, reason="needs DEQFUSION_DATA (MOGONET's ROSMAP) for the one-epoch reproduce")
def test_apply_then_reproduce_with_a_non_editable_install(tmp_path):
    python = env_python("nonedit")
    where = _run(python, [python, "-c", "import deqfusion; print(deqfusion.__file__)"], tmp_path)
    assert "site-packages" in where.stdout, where.stdout + where.stderr
    checkout = tmp_path / "deqfusion"
    checkout.mkdir()
    _checkout_copy(checkout)
    applied = _run(python, ["bash", "apply_patches.sh", "mmdynamics"], checkout, PYTHON=python)
    assert applied.returncode == 0, applied.stderr
    assert (checkout / "third_party" / "mmdynamics" / "model.py").is_file()

    out = tmp_path / "run"
    args = ["deqfusion", "reproduce", "mmdynamics", "--dataset", "rosmap", "--seeds", "1", "--epochs", "1",
            "--no-convergence", "--quiet", "--out", str(out)]
    ran = _run(python, args, checkout)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "MM-Dynamics (concatenation)" in ran.stdout and "DEQ fusion" in ran.stdout
    assert (out / "results.json").is_file()

    # from another folder the clone is not found without help: one line that names the fix ...
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = _run(python, args + ["--out", str(tmp_path / "run2")], elsewhere)
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert "./apply_patches.sh mmdynamics" in lost.stderr and "DEQFUSION_CLONES" in lost.stderr
    # ... and with $DEQFUSION_CLONES both the runner and the patch tool agree on it
    found = _run(python, args + ["--out", str(tmp_path / "run3")], elsewhere,
                 DEQFUSION_CLONES=str(checkout / "third_party"))
    assert found.returncode == 0, found.stderr[-3000:]
    status = _run(python, ["bash", str(checkout / "apply_patches.sh"), "status", "mmdynamics"], elsewhere,
                  PYTHON=python, DEQFUSION_CLONES=str(checkout / "third_party"))
    assert "applied on branch deqfusion" in status.stdout, status.stdout + status.stderr


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    """numpy comes with the [mmdynamics] extra; without it `reproduce mmdynamics` says so, no traceback."""
    python = env_python("nonedit")
    code = ("import sys; sys.modules['numpy'] = None; from deqfusion.cli import main; "
            "sys.exit(main(['reproduce', 'mmdynamics', '--dataset', 'rosmap', '--seeds', '1']))")
    res = _run(python, [python, "-c", code], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == ("deqfusion reproduce mmdynamics needs the package 'numpy', which is not "
                                  "installed: pip install 'deqfusion[mmdynamics]'")
