"""Drive an extra virtual environment made by .ci/envs/<name>.sh (see .ci/envs/README.md).

Heavy upstream environments (mmdetection3d, ...) live in their own venv; a test in the main run
calls into it with ``run_pytest_in``.  Without ``DEQFUSION_ENV_<NAME>`` the test skips and names the
script that makes the environment; under ``CI=true`` that is a failure, since CI makes every one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def env_var(name: str) -> str:
    return f"DEQFUSION_ENV_{name.upper()}"


def env_python(name: str) -> str:
    """The Python of environment ``name``, or skip (fail under CI) saying how to make it."""
    var = env_var(name)
    python = os.environ.get(var)
    how = (f"set {var} to the Python of the venv that .ci/envs/{name}.sh makes "
           f"(DEQFUSION_SRC=$PWD DEQFUSION_ENVS=/tmp/deqfusion-envs . .ci/envs/{name}.sh)")
    if not python:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{var} is not set under CI: .ci/run should have sourced .ci/envs/{name}.sh")
        pytest.skip(how)
    if not Path(python).is_file():
        pytest.fail(f"{var}={python} does not exist; {how}")
    return python


def run_pytest_in(name: str, tests: Sequence[str], *, timeout: float = 900,
                  extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run pytest on ``tests`` (paths under the repository) inside environment ``name``; assert it passed
    and that it ran tests (a run of only skips is a failure: it would be a silent skip)."""
    python = env_python(name)
    env = dict(os.environ, **(extra_env or {}))
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    sys.stdout.write(out[-20000:])
    assert proc.returncode == 0, f"pytest in the {name} environment failed ({proc.returncode}):\n{out[-8000:]}"
    assert " passed" in out, f"pytest in the {name} environment ran no test:\n{out[-4000:]}"
    return proc
