"""The MM-Dynamics adapter, the .cuda() shim, the runner's pieces and the patch file (no upstream needed)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deqfusion.adapters.common import cuda_shim
from deqfusion.adapters import mmdynamics as A
from deqfusion.adapters.mmdynamics import runner as R
from deqfusion.adapters.common import reproduce as reproduce_command
from deqfusion.adapters.mmdynamics import reproduce

PATCH_DIR = Path(__file__).resolve().parents[1] / "patches" / "mmdynamics"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in A.Settings.env_names():
        monkeypatch.delenv(k, raising=False)


def test_settings_from_env(monkeypatch):
    assert A.current_settings() == A.Settings()  # deq, full, weight 20
    monkeypatch.setenv("DEQFUSION_MMDYNAMICS_FUSION", "concat")
    monkeypatch.setenv("DEQFUSION_MMDYNAMICS_ABLATION", "no_gate")
    monkeypatch.setenv("DEQFUSION_MMDYNAMICS_JAC_WEIGHT", "0.5")
    monkeypatch.setenv("DEQFUSION_MMDYNAMICS_OPTIONS", "f_max_iter=30, f_tol=1e-4,f_solver=broyden")
    s = A.current_settings()
    assert (s.fusion, s.ablation, s.jac_weight) == ("concat", "no_gate", 0.5)
    assert s.options == {"f_max_iter": 30, "f_tol": 1e-4, "f_solver": "broyden"}
    # configure() wins over the environment, and is undone on exit
    with A.configure(fusion="deq", jac_weight=3.0) as chosen:
        assert A.current_settings() is chosen and chosen.fusion == "deq"
    assert A.current_settings().fusion == "concat"


def test_settings_validation():
    with pytest.raises(ValueError, match="fusion must be one of"):
        A.Settings(fusion="sum")
    with pytest.raises(ValueError, match="option 'ablation' cannot be set here: use the ablation setting"):
        A.Settings(options={"ablation": "full"})
    with pytest.raises(ValueError, match="Did you mean 'f_max_iter'"):
        A.Settings(options={"f_thres": 30})
    assert A.Settings(options={"f_max_iter": 7}).fusion_kwargs() == {"f_max_iter": 7, "b_max_iter": 106, "ablation": "full"}


def test_concat_is_torch_cat_and_adds_exact_zero():
    assert A.build_fusion(3, 8, A.Settings(fusion="concat")) is None
    assert A.fused_width(None, 3, 8) == 24
    xs = [torch.randn(4, 8) for _ in range(3)]
    fused, term = A.fuse(None, xs)
    assert torch.equal(fused, torch.cat(xs, 1)) and term == 0.0
    loss = torch.tensor(1.2345678, dtype=torch.float32)
    assert torch.equal(loss + term, loss)


def test_deq_fusion_module_shapes_and_stats():
    pytest.importorskip("deqfusion.layer")
    torch.manual_seed(0)
    fusion = A.build_fusion(3, 16, A.Settings(jac_weight=2.0, options={"f_max_iter": 20}))
    assert isinstance(fusion, A.MMDynamicsFusion) and A.fused_width(fusion, 3, 16) == 16
    assert fusion.deq.config.b_max_iter == 106 and fusion.deq.config.f_max_iter == 20
    xs = [torch.randn(5, 16) for _ in range(3)]
    fused, term = A.fuse(fusion, xs)
    assert fused.shape == (5, 16) and term.dim() == 0
    assert term.item() == pytest.approx(2.0 * fusion.last_jac_loss, rel=1e-5)
    (fused.sum() + term).backward()
    summary = A.stats_summary(fusion)
    assert summary["nstep_max"] <= 20 and sum(summary["status"].values()) == 5 and "jac_loss" in summary
    assert summary["backward"]["nstep_max"] >= 1 and sum(summary["backward"]["status"].values()) == 5
    fusion.eval()
    with torch.no_grad():
        _, term = A.fuse(fusion, xs)
    assert float(term) == 0.0 and "jac_loss" not in A.stats_summary(fusion)
    assert "DEQ fusion [full]" in repr(fusion)


def test_cuda_shim_redirects_and_restores():
    had_tensor_cuda = "cuda" in torch.Tensor.__dict__
    original_module_cuda = nn.Module.cuda
    with cuda_shim.cuda_redirect("cpu"):
        t = torch.ones(2).cuda()
        m = nn.Linear(2, 2).cuda()
        assert t.device.type == "cpu" and next(m.parameters()).device.type == "cpu"
        with cuda_shim.cuda_redirect("cpu"):  # nested
            torch.zeros(1).cuda(non_blocking=True)
        assert torch.ones(1).cuda().device.type == "cpu"
    assert ("cuda" in torch.Tensor.__dict__) == had_tensor_cuda
    assert nn.Module.cuda is original_module_cuda
    with pytest.raises(RuntimeError, match="boom"):
        with cuda_shim.cuda_redirect("cpu"):
            raise RuntimeError("boom")
    assert nn.Module.cuda is original_module_cuda
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="use --device cpu"):
            cuda_shim.resolve_device("cuda")
        assert cuda_shim.resolve_device("auto").type == "cpu"


def test_stratified_val_split():
    labels = [0] * 118 + [1] * 127
    tr, va = R.stratified_val_split(labels, 0.2, seed=3)
    assert sorted(tr + va) == list(range(245)) and not set(tr) & set(va)
    assert sum(labels[i] for i in va) == 25 and len(va) == 24 + 25
    assert R.stratified_val_split(labels, 0.2, seed=3) == (tr, va)
    assert R.stratified_val_split(labels, 0.2, seed=4)[1] != va
    with pytest.raises(ValueError):
        R.stratified_val_split(labels, 1.0, seed=0)


def test_metrics_from_probs():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = R.metrics_from_probs(labels, probs)
    assert m["acc"] == 50.0 and m["auc"] == 75.0 and set(m) >= {"f1", "f1_weighted", "f1_macro", "nll"}
    m5 = R.metrics_from_probs(np.array([0, 4]), np.eye(5)[[0, 4]])
    assert m5["acc"] == 100.0 and "auc" not in m5
    assert R.mean_std([80.0, 84.0]) == pytest.approx((82.0, 8 ** 0.5)) and R.mean_std([5.0])[0] == 5.0
    assert R.mean_std([5.0])[1] != R.mean_std([5.0])[1]  # one seed has no spread: NaN, printed without "± 0.00"
    assert reproduce._fmt(R.mean_std([5.0])) == "5.00" and reproduce._fmt(R.mean_std([4.0, 6.0])) == "5.00 ± 1.41"


def test_check_upstream_names_the_fix(tmp_path):
    with pytest.raises(R.UpstreamError, match=r"run ./apply_patches.sh mmdynamics .* or pass --upstream"):
        R.check_upstream(tmp_path)
    (tmp_path / "model.py").write_text("import torch\n")
    (tmp_path / "train_test.py").write_text("")
    with pytest.raises(R.UpstreamError, match="not patched"):
        R.check_upstream(tmp_path)


def test_patch_series_is_minimal():
    patches = sorted(PATCH_DIR.glob("*.patch"))
    assert patches, "patches/mmdynamics/*.patch missing"
    for p in patches:
        text = p.read_text()
        assert re.findall(r"^diff --git a/(\S+)", text, re.M) == ["model.py"]  # train_test.py stays untouched
        hunks = re.split(r"^@@.*@@.*$", text.split("\n---\n", 1)[1], flags=re.M)[1:]
        for hunk in hunks:
            lines = [ln for ln in hunk.splitlines() if ln and not ln.startswith("-- ")]
            context = [ln for ln in lines if ln.startswith(" ")]
            changed = [ln for ln in lines if ln[0] in "+-"]
            assert changed and len(context) <= 2 * len(changed), "more context than -U1 gives"
        added = [ln[1:] for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert all("deq_adapter" in ln or ln.strip() == "MMLoss = MMLoss + jac_term" for ln in added)


def test_cli_surface():
    parser = argparse.ArgumentParser(prog="deqfusion")
    sub = parser.add_subparsers(dest="command")
    reproduce_command.register(sub)
    args = parser.parse_args(["reproduce", "mmdynamics", "--dataset", "ROSMAP", "--seeds", "3", "--ablation",
                              "--option", "f_max_iter=40", "--modalities", "--protocol", "both"])
    assert args.dataset == "rosmap" and args.seeds == 3 and args.ablation == [] and args.option == [("f_max_iter", 40)]
    rows = reproduce.build_rows(args, reproduce.mogonet_data.spec("rosmap"))
    keys = [r.key for r in rows]
    assert keys[0] == "concat" and [k for k in keys if k.startswith("deq:") and "@" not in k] == [
        "deq:" + a for a in reproduce.ABLATION_ROWS]
    assert {"concat@0+1", "deq:full@1+2"} <= set(keys)
    deq_rows = [r for r in rows if r.settings.fusion == "deq"]
    assert all(r.settings.options == {"f_max_iter": 40, "b_max_iter": 12} and r.settings.jac_weight == 0.1
               for r in deq_rows)  # ROSMAP defaults, --option on top
    assert next(r for r in rows if r.key == "deq:full@0+2").modalities == (0, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "mmdynamics", "--ablation", "bogus"])
    # BRCA keeps the paper's settings: Jacobian weight 20, 105 / 106 solver steps
    args = parser.parse_args(["reproduce", "mmdynamics", "--dataset", "brca"])
    assert args.threads == 1 and args.jobs == 0
    (deq_row,) = [r for r in reproduce.build_rows(args, reproduce.mogonet_data.spec("brca")) if r.settings.fusion == "deq"]
    assert deq_row.settings.jac_weight == 20 and deq_row.settings.options == {}
    assert deq_row.settings.fusion_kwargs() == {"f_max_iter": 105, "b_max_iter": 106, "ablation": "full"}
    assert "b_max_iter=106" in deq_row.settings.describe()


def test_default_jobs_one_worker_per_threads_cores(monkeypatch):
    from deqfusion.adapters.common import run_pool

    monkeypatch.setattr(run_pool.os, "cpu_count", lambda: 8)
    assert run_pool.default_jobs(1, "cpu", 21) == 8      # one single-threaded run per core
    assert run_pool.default_jobs(2, "cpu", 21) == 4      # never more threads than cores
    assert run_pool.default_jobs(1, "cpu", 3) == 3       # no idle workers
    assert run_pool.default_jobs(3, "cpu", 21) == 2
    assert run_pool.default_jobs(16, "cpu", 21) == 1
    assert run_pool.default_jobs(0, "cpu", 21) == 1      # torch's own thread count: one run at a time
    assert run_pool.default_jobs(1, "cuda", 21) == 1     # one GPU: runs queue on it


def test_run_tasks_reports_a_failing_worker(tmp_path):
    """A run that fails in a worker raises here, naming the cause; runs already done were delivered."""
    from deqfusion.adapters.mmdynamics import runner as R
    from deqfusion.adapters.common import run_pool

    bad = R.RunSpec("ROSMAP", tmp_path, seed=0, epochs=0, device="cpu", threads=1,
                    settings=A.Settings(fusion="concat"))
    done = []
    with pytest.raises(R.UpstreamError):
        tasks = [R.Task(bad, upstream=tmp_path / "no-clone")] * 2
        run_pool.run_tasks(tasks, R.execute, jobs=2, threads=1,
                           on_epoch=lambda i: None, on_done=lambda i, r: done.append(i))
    assert done == []
