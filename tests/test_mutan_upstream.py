"""Mutan on the real block.bootstrap.pytorch at its pinned commit: the plugin installed by options alone, and
block's own training entry (``python -m bootstrap.run``) training the baseline and DEQ fusion on CPU on
generated VQA-v2-format data, through ``deqfusion reproduce mutan --generated --quick``.

Needs DEQFUSION_MIRROR (a snapshot of Cadene/block.bootstrap.pytorch) and the venv of .ci/envs/mutan.sh
(DEQFUSION_ENV_MUTAN); each missing one is a skip that says so (under CI a missing venv fails).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from deqfusion.adapters.common.report import GENERATED
from deqfusion.adapters.mutan import SAMPLE_KEYS, UPSTREAM_COMMIT
from helpers_envs import env_python, run_pytest_in
from helpers_upstream import mirror_clone

pytestmark = pytest.mark.mirror


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """``./apply_patches.sh mutan`` (plugin route: the pinned commit on branch deqfusion, no patch)."""
    from deqfusion.upstream.cli import main

    mirror = mirror_clone("mutan", UPSTREAM_COMMIT)
    dest = tmp_path_factory.mktemp("mutan") / "block"
    assert main(["apply", "mutan", "--source", str(mirror), "--dest", str(dest)]) == 0
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == UPSTREAM_COMMIT
    assert subprocess.run(["git", "-C", str(dest), "status", "--porcelain"], capture_output=True,
                          text=True).stdout.strip() == ""          # nothing of the upstream is edited
    return dest


def test_in_the_mutan_venv(clone):
    """Compatibility, options vs block's, settings from bootstrap's Options, block's Mutan swapped (env side)."""
    run_pytest_in("mutan", ["tests/envs/mutan/test_mutan_env.py"], timeout=600,
                  extra_env={"DEQFUSION_TEST_MUTAN_CLONE": str(clone), "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def reproduced(clone, tmp_path_factory):
    from deqfusion import cli

    python = env_python("mutan")
    out = tmp_path_factory.mktemp("mutan-runs")
    code = cli.main(["reproduce", "mutan", "--generated", "--quick", "--grad-log", "--upstream", str(clone),
                     "--python", python, "--out", str(out), "--timeout", "900",
                     "--view", "tensorboard"])             # bootstrap's other view: the venv has no plotly 3
    results = json.loads((out / "results.json").read_text())
    yield code, out, results
    for ckpt in out.glob("*/ckpt_*.pth.tar"):    # 300 MB per run (skip-thoughts' GRU and its Adamax state)
        ckpt.unlink()


def _logs(out: Path, row: str):
    return json.loads((out / row / "logs.json").read_text())


@pytest.mark.parametrize("row, fusion", [("mutan", "Mutan"), ("mutan_deq", "DEQClassifier")])
def test_blocks_training_learns_and_trains_the_fusion(reproduced, row, fusion):
    code, out, results = reproduced
    assert code == 0, (out / f"{row}.stdout.log").read_text()[-4000:]
    run = results["runs"][row]
    losses = run["train_loss"]
    assert len(losses) >= 6 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses      # training loss goes down
    assert all(math.isfinite(v) for v in run["eval_loss"])
    grads = run["gradients"]
    assert len(grads) == len(losses)                                 # one record per training step
    for g in grads:
        assert g["fusion"] == fusion and g["reached"] == g["tensors"] > 0, g
        assert math.isfinite(g["grad_norm"]) and g["grad_norm"] > 0
    logs = (out / row / "logs.txt").read_text()
    assert "Traceback" not in logs


@pytest.mark.parametrize("row", ["mutan", "mutan_deq"])
def test_blocks_evaluation_gives_its_accuracy_lines(reproduced, row):
    _, out, results = reproduced
    logs = (out / row / "logs.txt").read_text()
    assert re.search(r"eval_epoch\.accuracy_top1: [\d.]+", logs) and "Overall Traditional Accuracy is" in logs
    assert "python -m block.models.metrics.compute_oe_accuracy" in logs
    oe = json.loads((out / row / "logs_val_oe.json").read_text())     # block's VQA evaluation (background)
    for key in ("overall", "perAnswerType.yes/no", "perAnswerType.number", "perAnswerType.other"):
        values = oe[f"eval_epoch.{key}"]
        assert values and all(0.0 <= v <= 100.0 for v in values), key
    assert results["runs"][row]["oe"]["overall"] == oe["eval_epoch.overall"][-1]


def test_options_saved_with_each_experiment(reproduced):
    _, out, _ = reproduced
    base = (out / "mutan" / "options.yaml").read_text()
    assert "block_tucker" not in base and base.count("type: mutan") == 2
    assert "deqfusion" not in base                                   # the baseline is block's network and criterion
    deq = (out / "mutan_deq" / "options.yaml").read_text()
    assert "import: deqfusion.adapters.mutan.network" in deq and "import: deqfusion.adapters.mutan.criterion" in deq
    assert "jac_weight: 0.1" in deq and "dim: 64" in deq


def test_deq_statistics_are_in_bootstraps_log(reproduced):
    _, out, results = reproduced
    logs = _logs(out, "mutan_deq")
    jac = logs["train_batch.jac_loss"]
    assert jac and all(math.isfinite(v) and v > 0 for v in jac)
    assert all(1 <= n <= 12 for n in logs["train_batch.deq_nstep"] + logs["eval_batch.deq_nstep"])
    assert all(math.isfinite(v) for v in logs["train_batch.deq_rel_residual_max"])
    assert logs["eval_epoch.jac_loss"] == [0.0]                       # no Jacobian work in evaluation
    # loss = block's cross-entropy + 0.1 x the Jacobian term, step by step
    for total, ce, j in zip(logs["train_batch.loss"], logs["train_batch.loss_vqa"], jac):
        assert total == pytest.approx(ce + 0.1 * j, rel=1e-5)
    assert not any(k.endswith(SAMPLE_KEYS) for k in logs)            # per-sample tensors stay out of the log
    text = (out / "mutan_deq" / "logs.txt").read_text()
    assert "deqfusion: DEQ fusion replaces the Mutan answer fusion" in text
    assert "train_batch.jac_loss" not in _logs(out, "mutan")


def test_table5_is_printed_with_the_label(reproduced, capsys):
    _, out, _ = reproduced
    table = (out / "table.md").read_text()
    assert "Table 5" in table and "| Mutan on VQA-v2 | Yes/no | Number | Other | Overall |" in table
    ours = [ln for ln in table.splitlines() if "— ours" in ln]
    assert len(ours) == 2 and all(ln.count(GENERATED) == 5 for ln in ours)   # the row and its four numbers
