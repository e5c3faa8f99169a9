"""The benchmark runs end to end (`--quick`), and its run-time shims for the authors' release work.

With DEQFUSION_OFFICIAL pointing to a checkout of github.com/jinhong-ni/DEQFusion, the release
is also loaded for real: same weights, same fixed point as deqfusion.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = os.environ.get("DEQFUSION_OFFICIAL")


def test_quick_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--json", str(out), "--markdown", str(md)]
    if OFFICIAL:
        cmd += ["--official", OFFICIAL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["shapes"]) == {"brca", "mmimdb", "vqa", "imvotenet"}
    for name, shape in res["shapes"].items():
        fwd = {r["contender"]: r for r in shape["forward"]}
        ours = fwd["deqfusion anderson"]
        assert ours["f_calls"] >= 1 and ours["forward_s"] > 0 and 0 <= ours["res_max"] < float("inf")
        assert ours["sample_evals"] <= ours["f_calls"] * ours["batch"]
        assert {"deqfusion broyden", "deqfusion fixed_point_iter"} <= set(fwd)
        trn = {r["contender"]: r for r in shape["training"]}
        assert trn["deqfusion anderson"]["backward_s"] > 0
        mem = {r["contender"]: r for r in shape["memory"]}
        assert {"deqfusion anderson", "deqfusion unrolled"} <= set(mem)
        if name == "imvotenet":
            assert "skipped" in fwd["official release"]
    assert "Targets" in proc.stdout and "| shape |" in proc.stdout
    assert md.read_text().startswith("# Benchmarks")


def test_captured_comparison_matches_eager(tmp_path):
    """--captured: the sync-free solve compiled with torch.compile(mode="reduce-overhead") gives the
    eager numbers (forward output and gradients), and the report carries its table."""
    out, md = tmp_path / "cap.json", tmp_path / "cap.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--shapes", "mmimdb", "--skip", "forward", "training",
           "memory", "solvers", "--captured", "--captured-iters", "2", "--json", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["shapes"]["mmimdb"]["captured"]
    assert [r["part"] for r in rows] == ["forward solve", "training step"]
    assert all(r["iters"] == 2 and r["captured_s"] > 0 and r["eager_s"] > 0 for r in rows)
    assert rows[0]["max_abs_diff"] < 1e-4 and rows[1]["max_rel_grad_diff"] < 1e-4
    text = md.read_text()
    assert "Eager vs captured" in text and "| mmimdb | forward solve | 2 |" in text and "## Targets" not in text


STAND_IN = {
    # a stand-in with the release's calling conventions (not its code): a solver module that
    # calls the removed torch.solve and imports termcolor, a module that calls .cuda() and
    # torch.cuda.synchronize(), imported by bare names
    "solver.py": """
        import torch
        from termcolor import colored

        def anderson(f, x0, threshold=5, eps=1e-3, stop_mode="rel", **kwargs):
            H = torch.eye(2).expand(x0.shape[0], 2, 2)
            y = torch.ones(x0.shape[0], 2, 1)
            sol = torch.solve(y, H)[0]
            return {"result": f(x0) * sol[:, :1, 0].mean(), "nstep": 1, "label": colored("ok", "green")}
    """,
    "jacobian.py": """
        def jac_loss_estimate(f0, z0, vecs=2, create_graph=True):
            return 0
    """,
    "DEQ_fusion.py": """
        import torch
        from solver import anderson
        from jacobian import jac_loss_estimate

        def run(x):
            z = torch.zeros(x.shape[0], x.shape[1]).cuda()
            out = anderson(lambda z: z + x, z)
            torch.cuda.synchronize()
            print(out["nstep"])
            return out
    """,
}


def test_release_shims_patch_and_restore(tmp_path):
    from bench import official

    for name, text in STAND_IN.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    saved = {k: sys.modules.get(k) for k in ("solver", "jacobian")}
    module = official.load(str(tmp_path))
    assert {k: sys.modules.get(k) for k in ("solver", "jacobian")} == saved    # names handed back
    x = torch.randn(3, 4)
    with pytest.raises((AssertionError, RuntimeError)):   # .cuda() without CUDA / torch.solve removed
        module.run(x)
    cuda_before, solve_before = torch.Tensor.cuda, getattr(torch, "solve", None)
    with official.shims(torch.device("cpu")):
        out = module.run(x)
    assert torch.allclose(out["result"], x)
    assert torch.Tensor.cuda is cuda_before and getattr(torch, "solve", None) is solve_before


def test_release_checkout_is_recognised_or_refused(tmp_path):
    from bench import official

    with pytest.raises(official.OfficialUnavailable, match="DEQ_fusion.py"):
        official.find_checkout(str(tmp_path))


@pytest.mark.skipif(not OFFICIAL, reason="set DEQFUSION_OFFICIAL to a checkout of github.com/jinhong-ni/DEQFusion")
def test_release_with_our_weights_computes_our_map_and_fixed_point():
    from bench import official
    from deqfusion import DEQFusion

    torch.manual_seed(0)
    ours = DEQFusion(32, 2, block_residual=True, f_tol=1e-6, f_max_iter=200).eval()
    with torch.no_grad():                     # contractive, so both solvers find the one fixed point
        for name, p in ours.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(0.3)
    xs = [torch.randn(6, 32) for _ in range(2)]
    module = official.load(OFFICIAL)
    with official.shims(torch.device("cpu")), torch.no_grad():
        off = official.build(module, ours, f_thres=60).eval()
        official.set_solver(module, off, eps=1e-6, stop_mode="rel")
        fused, result = official.fused_and_state(module, off, xs)
        z = result["result"]
        x_fuse = ours._weighted_sum(xs)
        f, _ = ours._problem(xs, x_fuse, [None] * 3)
        theirs = module.list2vec(off.func_(module.vec2list(z, [32] * 3), list(xs) + [x_fuse]))
        ref = ours(xs).fused
    assert torch.allclose(theirs, f(z), atol=1e-5)            # the same map, weight for weight
    # the same fixed point, up to the residual the release's Anderson reaches (it stalls near
    # 1e-4 relative in float32: its Tikhonov term is absolute)
    assert float(((f(z) - z).norm(dim=1) / f(z).norm(dim=1)).max()) < 1e-3
    assert torch.allclose(fused, ref, atol=1e-2)
