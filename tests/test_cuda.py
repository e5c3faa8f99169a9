"""The core on CUDA: outputs against the CPU float64 reference, per-sample statistics, and a solve
free of host syncs in check_every=0 mode. Skips (saying so) on a machine without CUDA; run by
bench/gpu_check.sh on a GPU machine."""
from __future__ import annotations

import pytest
import torch

from deqfusion import DEQFusion
from helpers_core import contractive_fusion, inputs, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")


def _pair(**options):
    ref = contractive_fusion(scale=0.4, f_tol=1e-6, f_max_iter=100, b_tol=1e-6, b_max_iter=100, **options).eval()
    dev = DEQFusion(ref.config.dim, ref.config.num_modalities, **{k: getattr(ref.config, k) for k in options},
                    f_tol=1e-6, f_max_iter=100, b_tol=1e-6, b_max_iter=100).cuda().float().eval()
    dev.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, dev


@pytest.mark.parametrize("spatial", [(), (32,)])
def test_cuda_float32_matches_cpu_float64(spatial):
    ref, dev = _pair()
    xs = inputs(64, (16, 16), spatial=spatial)
    with torch.no_grad():
        out_ref = ref(xs)
        out_dev = dev([x.cuda().float() for x in xs])
    assert out_dev.fused.device.type == "cuda"
    assert rel_err(out_dev.fused.double().cpu(), out_ref.fused) < 1e-4
    assert out_dev.stats.status.shape == (64,) and out_dev.stats.status.device.type == "cuda"
    assert out_dev.stats.converged.all() and out_ref.stats.converged.all()


def test_cuda_gradients_match_cpu_float64():
    ref, dev = _pair(jac_reg=False)
    xs = inputs(16, (16, 16))
    target = torch.randn(16, 16, dtype=torch.float64)
    loss_ref = (ref(xs).fused - target).pow(2).sum()
    g_ref = torch.autograd.grad(loss_ref, list(ref.parameters()))
    loss_dev = (dev([x.cuda().float() for x in xs]).fused - target.cuda().float()).pow(2).sum()
    g_dev = torch.autograd.grad(loss_dev, list(dev.parameters()))
    for a, b in zip(g_dev, g_ref):
        assert rel_err(a.double().cpu(), b) < 1e-3


def test_sync_free_solve_makes_no_host_sync():
    """check_every=0: a fixed number of steps with no early-exit test, so no step waits for the GPU."""
    fusion = DEQFusion(64, 2, check_every=0, f_max_iter=12).cuda().eval()
    xs = [torch.randn(32, 64, device="cuda") for _ in range(2)]
    with torch.no_grad():
        fusion(xs)                                   # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fusion(xs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.stats.nstep.shape == (32,)
