"""DEQFusion's contract: shapes, batch invariance, ablations, dtypes, dropout, compile, divergence."""
from __future__ import annotations

import pytest
import torch

from deqfusion import ABLATIONS, DEQFusion, FusionOutput, Status
from helpers_core import one_thread  # noqa: F401  (a fixture, used by pytestmark)
from helpers_core import contractive_fusion, forward_and_fixed_point, inputs, perturbed, rel_err
from reference_fusion import reference_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_output_is_named_and_a_plain_triple():
    fusion = DEQFusion(32, 2)
    out = fusion(inputs(5, (32, 32), dtype=torch.float32))
    assert isinstance(out, FusionOutput)
    fused, jac_loss, stats = out
    assert fused.shape == (5, 32) and fused is out.fused
    assert jac_loss.dim() == 0 and jac_loss.requires_grad        # training mode: Hutchinson estimate
    assert stats.nstep.shape == (5,) and stats.status.shape == (5,)
    assert stats.rel_trace.shape[0] == 5 and stats.rel_trace.shape[1] == stats.num_evals


@pytest.mark.parametrize("spatial", [(), (7,), (3, 4)])
def test_spatial_features_and_projected_widths(spatial):
    fusion = DEQFusion(16, 3, in_dims=[10, 16, 5])
    xs = inputs(2, (10, 16, 5), dtype=torch.float32, spatial=spatial)
    out = fusion(xs)
    assert out.fused.shape == (2, 16, *spatial)
    out.fused.sum().backward()
    assert fusion.projections[0].weight.grad is not None and fusion.projections[2].weight.grad is not None


def test_batch_invariance_float64():
    """Each sample's output, step count and status are the same alone or inside a batch of 32 mixed
    samples (input scales over two decades, so step counts differ), for every sample that
    converges either way. Bitwise: ChannelLinear pads CPU GEMMs to whole row blocks so that a
    sample's arithmetic does not depend on the batch (core/blocks.py). A sample that converges
    neither way follows a chaotic trajectory, where no solver can promise bitwise-stable results."""
    fusion = contractive_fusion(dim=16, n=2, scale=0.5, f_tol=1e-10, f_max_iter=200)
    fusion.eval()
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(-1, 1, 32, dtype=torch.float64).view(32, 1)       # input scales: easy to hard
    xs = [torch.randn(32, 16, generator=g, dtype=torch.float64) * scales for _ in range(2)]
    with torch.no_grad():
        batch_out = fusion(xs)
        alone = [fusion([x[i:i + 1] for x in xs]) for i in range(32)]
    st = batch_out.stats
    either = [i for i in range(32) if bool(st.converged[i]) or bool(alone[i].stats.converged[0])]
    assert len(either) >= 24, st.summary()
    assert len(set(st.nstep.tolist())) > 5, "samples should need different step counts"
    for i in either:
        a = alone[i]
        assert int(a.stats.status[0]) == int(st.status[i]), i
        assert int(a.stats.nstep[0]) == int(st.nstep[i]), i
        assert torch.equal(a.fused[0], batch_out.fused[i]), (i, rel_err(a.fused[0], batch_out.fused[i]))
        assert torch.equal(a.stats.rel_lowest[0], st.rel_lowest[i]), i


def _param_names(fusion):
    return {n.split(".")[0] + ("." + n.split(".")[2] if n.startswith("fusion_block") else "") for n, _ in fusion.named_parameters()}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_every_ablation_row_builds_runs_and_has_its_parameters(ablation):
    fusion = DEQFusion(16, 2, ablation=ablation)
    xs = [x.requires_grad_() for x in inputs(3, (16, 16), dtype=torch.float32)]
    out = fusion(xs)
    (out.fused.square().mean() + out.jac_loss).backward()
    names = {n for n, _ in fusion.named_parameters()}
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    blocks, fuse, gate, _ = ABLATIONS[ablation]
    solving = ablation != "weighted_sum"
    assert has("modality_blocks") == (blocks and solving)
    assert has("fusion_block") == (fuse and solving)
    assert has("fusion_block.gate") == (fuse and gate and solving)
    assert has("modality_weights") == (fuse or not solving)
    # no unused parameter in any row (DDP needs no find_unused_parameters)
    unused = [n for n, p in fusion.named_parameters() if p.grad is None]
    assert not unused, unused
    assert all(x.grad is not None for x in xs)
    if ablation == "weighted_sum":
        w = fusion.modality_weights.detach()
        # the same float32 operations in the same order: measured equal (rounding would be ~1e-7)
        assert rel_err(out.fused.detach(), w[0] * xs[0] + w[1] * xs[1] + fusion.fuse_bias.detach()) <= 1e-6
    if ablation == "no_deq":
        assert fusion.config.solve_kind == "unrolled" and int(out.stats.nstep.max()) == 1
    if ablation in ("full", "no_gate", "modality_deq", "fusion_deq"):
        assert fusion.config.solve_kind == "deq"


def test_fusion_deq_keeps_modalities_fixed():
    """fusion_deq (f_fuse + DEQ, f_theta = identity): the solver iterates z_fuse alone and the fused
    branch reads z_i = x_i at every step -- each weight-tied step and the fixed point equal the
    reference map that feeds the (projected) inputs to f_fuse throughout, and the inputs matter."""
    fusion = perturbed(contractive_fusion(dim=16, n=2, in_dims=(12, 16), ablation="fusion_deq", f_tol=1e-12,
                                          f_max_iter=200))
    fusion.eval()
    assert fusion.modality_blocks is None
    ref = reference_for(fusion)
    xs = inputs(3, (12, 16), spatial=(2,))
    with torch.no_grad():
        out, z_star = forward_and_fixed_point(fusion, xs)
        assert out.stats.converged.all(), out.stats.summary()
        assert len(z_star) == 1, "fusion_deq's state is z_fuse alone: the modalities are not iterated"
        for k in (1, 2, 5):
            unrolled = DEQFusion(16, 2, in_dims=(12, 16), ablation="fusion_deq", mode="unrolled", unroll_steps=k).double()
            unrolled.load_state_dict(fusion.state_dict())
            assert rel_err(unrolled(xs).fused, ref.iterate(xs, k)) <= 1e-13, k     # measured <= 1e-15
        # the fixed point of z_fuse = f_fuse(z_fuse; x_1..x_N, x_fuse); measured 5e-13 (tolerance 1e-12)
        assert rel_err(out.fused, ref.iterate(xs, 200)) <= 1e-11
        moved = [xs[0], xs[1] + 1.0]                   # x_2 feeds the gate: moving it moves the output
        assert rel_err(fusion(moved).fused, out.fused) > 1e-2


def test_modality_deq_sums_the_modality_fixed_points():
    """modality_deq (f_theta + DEQ, no f_fuse): fused = sum_i z_i*, each z_i* the fixed point of
    the reference f_theta_i(.; x_i), found here by plain iteration."""
    fusion = perturbed(contractive_fusion(dim=16, n=2, ablation="modality_deq", f_tol=1e-12, f_max_iter=200))
    fusion.eval()
    assert fusion.fusion_block is None and fusion.modality_weights is None
    ref = reference_for(fusion)
    xs = inputs(2, (16, 16))
    with torch.no_grad():
        out = fusion(xs)
        states = [torch.zeros(2, 16, dtype=torch.float64) for _ in range(2)]
        for _ in range(300):
            states = [ref.f_theta(i, z, x) for i, (z, x) in enumerate(zip(states, xs))]
    assert out.stats.converged.all(), out.stats.summary()
    assert rel_err(out.fused, sum(states)) < 1e-11                    # measured 1.9e-13 (tolerance 1e-12)


def test_unrolled_mode_backprops_through_steps_and_traces_each_step():
    fusion = DEQFusion(16, 2, mode="unrolled", unroll_steps=6)
    out = fusion(inputs(3, (16, 16), dtype=torch.float32))
    assert out.stats.rel_trace.shape == (3, 6) and out.stats.solver == "unrolled"
    assert float(out.jac_loss) == 0.0
    out.fused.sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_dropout_mask_is_fixed_across_iterations():
    """With dropout inside the map, the solve still converges tightly: one mask for all iterations.
    (A fresh mask per iteration would leave residuals of order 1.)"""
    fusion = contractive_fusion(dim=16, n=2, scale=0.3, dropout=0.5, f_tol=1e-10, f_max_iter=200)
    fusion.train()
    out = fusion(inputs(4, (16, 16)))
    assert out.stats.converged.all(), out.stats.summary()
    fusion.eval()
    out_eval = fusion(inputs(4, (16, 16)))
    assert rel_err(out.fused.detach(), out_eval.fused.detach()) > 1e-2   # masks only in training (measured 0.2)


def test_non_contractive_map_is_reported_per_sample_with_finite_output():
    torch.manual_seed(0)
    fusion = DEQFusion(16, 2, f_max_iter=30, block_residual=True)
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(40.0)
    fusion.eval()
    with torch.no_grad():
        out = fusion(inputs(8, (16, 16), dtype=torch.float32))
    assert torch.isfinite(out.fused).all()
    bad = (out.stats.status == Status.MAX_ITER) | (out.stats.status == Status.DIVERGED)
    assert bad.any(), out.stats.summary()
    assert not (out.stats.status == Status.NON_FINITE).any()
    assert "max_iter" in out.stats.counts() and sum(out.stats.counts().values()) == 8


def test_nan_input_sample_is_flagged_not_leaked():
    fusion = DEQFusion(16, 2)
    fusion.eval()
    xs = inputs(4, (16, 16), dtype=torch.float32)
    xs[0][2, 3] = float("nan")
    with torch.no_grad():
        out = fusion(xs)
    assert int(out.stats.status[2]) == Status.NON_FINITE
    assert (out.stats.status[[0, 1, 3]] != Status.NON_FINITE).all()
    with torch.no_grad():
        clean = fusion([x[[0, 1, 3]] for x in inputs(4, (16, 16), dtype=torch.float32)])
    # bitwise: per-sample arithmetic does not depend on the batch (see the batch-invariance test)
    assert torch.equal(out.fused[[0, 1, 3]], clean.fused)
    assert torch.equal(out.stats.nstep[[0, 1, 3]], clean.stats.nstep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtypes_follow_inputs(dtype):
    fusion = DEQFusion(16, 2).to(dtype)
    out = fusion(inputs(3, (16, 16), dtype=dtype))
    assert out.fused.dtype == dtype
    (out.fused.sum() + out.jac_loss).backward()


def test_bf16_autocast():
    fusion = DEQFusion(32, 2)
    xs = inputs(4, (32, 32), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion(xs)
        loss = out.fused.float().square().mean() + out.jac_loss
    loss.backward()
    assert torch.isfinite(out.fused.float()).all()
    ref = fusion(xs).fused
    # bf16 matmuls (8-bit mantissa: relative rounding 3.9e-3), same fixed point: measured 3.8e-3
    assert rel_err(out.fused.float().detach(), ref.detach()) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_torch_compile_of_a_model_containing_deqfusion():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(12, 16)
            self.fusion = DEQFusion(16, 2, f_max_iter=8, check_every=0)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, a, b):
            fused, jac, _ = self.fusion([self.enc(a), self.enc(b)])
            return self.head(fused), jac

    torch.manual_seed(0)
    model = Model()
    a, b = torch.randn(4, 12), torch.randn(4, 12)
    eager, _ = model(a, b)
    compiled = torch.compile(model, backend="inductor")
    out, jac = compiled(a, b)
    # float32, inductor's kernels reassociate sums: measured 1.7e-6 on outputs of size ~1
    assert torch.allclose(out, eager, rtol=0, atol=2e-5)
    (out.sum() + jac).backward()
    assert model.enc.weight.grad is not None
