"""What a newcomer trips on (issue 9's list): each as a check that fails if it comes back."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqfusion import DEQFusion
from deqfusion.solvers import SolverStats, Status

REPO = Path(__file__).resolve().parents[1]


def test_cli_help_imports_no_torch():
    """`deqfusion --help` took 5.5 s because it imported torch (and numpy) just to build its parser."""
    code = ("import sys; from deqfusion.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "deqfusion.cli", *args, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return re.sub(r"\s+", " ", out.stdout)


def test_reproduce_help_states_each_default_once():
    text = _help("reproduce", "mmdynamics")
    assert "(default: None)" not in text and "(default: False)" not in text
    for option_help in re.split(r" --", text):
        assert option_help.lower().count("default") <= 1, option_help
    assert "--seeds SEEDS number of seeds (0..N-1) (default: 10)" in text


def test_demo_help_matches_the_readme_and_has_threads():
    text = _help("demo")
    assert "a few minutes" not in text and "about a minute" in text
    assert "--threads THREADS" in text and "default 1" in text


def test_stats_summary_counts_are_not_read_as_settings():
    stats = SolverStats.empty(5, torch.device("cpu"), solver="anderson")
    stats.status = torch.tensor([Status.CONVERGED] * 1 + [Status.MAX_ITER] * 4)
    text = stats.summary()
    assert "1 converged, 4 at the step cap" in text and "max_iter=" not in text


def test_two_tensors_instead_of_a_list_says_to_pass_a_list():
    fusion = DEQFusion(8, 2)
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"one list of 2 tensors: fusion\(\[x_1, x_2\]\)"):
        fusion(x, x)


def test_one_seed_prints_no_spread():
    from deqfusion.adapters.common.report import fmt_mean_std, mean_std, plural

    assert fmt_mean_std(*mean_std([81.0])[:2]) == "81.00"
    assert fmt_mean_std(*mean_std([80.0, 82.0])[:2]) == "81.00 ± 1.41"
    assert plural(1, "seed") == "1 seed" and plural(10, "seed") == "10 seeds"


def test_planned_upstream_says_so_first_and_needs_allow_planned(fake, run):
    manifest = fake.manifest
    manifest.write_text(manifest.read_text().replace('status = "ready"', 'status = "planned"', 1))
    dest = fake.dest("planned")
    code, out, err = run("apply", "fake", "--source", str(fake.up), "--dest", str(dest))
    assert code == 2 and err.split(": error: ", 1)[1].startswith("fake is planned, not ready")
    assert "--allow-planned" in err and not dest.exists()
    code, out, err = run("apply", "fake", "--source", str(fake.up), "--dest", str(dest), "--allow-planned")
    assert code == 0, err
    assert out.splitlines()[0].startswith("warning: fake is planned, not ready")


def test_check_says_one_patch_applies(fake, run, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(fake.good.glob("*.patch"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    code, out, err = run("check", "fake", "--source", str(fake.up), "--dest", str(tmp_path / "c"), "--patches", str(one))
    assert code == 0, err
    assert "1 patch applies cleanly" in out


def test_help_examples_use_a_ready_upstream():
    from deqfusion.upstream.cli import EPILOG
    from deqfusion.upstream.manifest import load_manifest

    manifest = load_manifest()
    named = set(re.findall(r"\./apply_patches\.sh (?:restore )?([a-z0-9_]+)\b", EPILOG)) - {"list", "restore"}
    assert named and all(manifest.get(n).status == "ready" for n in named), named
    doc = (REPO / "docs" / "upstreams.md").read_text()
    example = doc.split("```bash", 1)[1].split("```", 1)[0]
    for name in re.findall(r"\./apply_patches\.sh ([a-z0-9_]+)\b", example):
        if name != "list":
            assert manifest.get(name).status == "ready", name


def test_readme_names_the_environment_and_every_upstream():
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "DEQFUSION_DATA" in setup and "DEQFUSION_MIRROR" in setup
    assert "mmdet3d" in text.split("## Upstreams", 1)[1]
    assert "`divergence_factor`" in text
