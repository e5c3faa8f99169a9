"""The implicit backward against independent float64 references: unrolled iteration and finite differences."""
from __future__ import annotations

import pytest
import torch

from deqfusion import DEQFusion
from deqfusion.solvers import solve
from helpers_core import contractive_fusion, inputs, rel_err

TIGHT = dict(f_max_iter=400, f_tol=1e-13, b_max_iter=400, b_tol=1e-13, b_stop_mode="abs")


def unrolled_reference(fusion: DEQFusion, xs, steps: int):
    """Same weights, plain iteration from zeros for `steps` steps, autograd through every step."""
    ref = DEQFusion(fusion.config.dim, fusion.config.num_modalities, in_dims=fusion.config.in_dims,
                    ablation=fusion.config.ablation, block_residual=fusion.config.block_residual,
                    mode="unrolled", unroll_steps=steps).double()
    ref.load_state_dict(fusion.state_dict())
    return ref


def loss_of(fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((fused - target) ** 2).sum() + (fused ** 3).mean()


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("block_residual", [True, False])
def test_implicit_gradient_matches_unrolled_float64(solver, block_residual):
    fusion = contractive_fusion(scale=0.1 if block_residual else 0.3, block_residual=block_residual, f_solver=solver, b_solver=solver, jac_reg=False, **TIGHT)
    fusion.eval()   # no Jacobian term; gradients still flow (grad mode on)
    xs = [x.requires_grad_() for x in inputs(4, (16, 16))]
    target = torch.randn(4, 16, dtype=torch.float64)
    out = fusion(xs)
    assert out.stats.converged.all(), out.stats.summary()
    grads = torch.autograd.grad(loss_of(out.fused, target), xs + list(fusion.parameters()))
    assert out.stats.backward is not None and out.stats.backward.converged.all()

    ref = unrolled_reference(fusion, xs, steps=300)
    xs_r = [x.detach().clone().requires_grad_() for x in xs]
    out_r = ref(xs_r)
    assert float(out_r.stats.abs_lowest.max()) < 1e-12, "reference iteration must itself be converged"
    grads_r = torch.autograd.grad(loss_of(out_r.fused, target), xs_r + list(ref.parameters()))
    # same fixed point as plain iteration (the +z_i form also has unstable ones: see FusionConfig)
    assert rel_err(out.fused.detach(), out_r.fused.detach()) < 1e-10
    for g, gr in zip(grads, grads_r):
        assert rel_err(g.detach(), gr) <= 1e-6, rel_err(g.detach(), gr)


def test_implicit_gradient_matches_finite_differences():
    """Central differences of the solved layer (re-solved to 1e-13) on inputs and on weights."""
    fusion = contractive_fusion(dim=16, scale=0.3, jac_reg=False, **TIGHT)
    fusion.eval()
    xs = inputs(2, (16, 16))
    x0 = xs[0].clone().requires_grad_()
    weight = fusion.fusion_block.fuse.weight
    target = torch.randn(2, 16, dtype=torch.float64)

    def loss(x):
        return loss_of(fusion([x, xs[1]]).fused, target)

    g_x, g_w = torch.autograd.grad(loss(x0), [x0, weight])
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for tensor, grad in ((x0, g_x), (weight, g_w)):
        coords = torch.randperm(tensor.numel(), generator=gen)[:8]
        fd = []
        with torch.no_grad():
            for idx in coords.tolist():
                orig = tensor.view(-1)[idx].item()
                tensor.view(-1)[idx] = orig + eps
                up = loss(x0)
                tensor.view(-1)[idx] = orig - eps
                down = loss(x0)
                tensor.view(-1)[idx] = orig
                fd.append(float(up - down) / (2 * eps))
        fd_t = torch.tensor(fd, dtype=torch.float64)
        assert rel_err(grad.reshape(-1)[coords], fd_t) <= 1e-6, (grad.reshape(-1)[coords], fd_t)


def test_default_tolerances_give_accurate_gradients():
    """With the shipped defaults (no tightening), the gradient is within 1e-4 of the float64 reference."""
    fusion = contractive_fusion(dim=32, n=3, jac_reg=False)
    fusion.eval()
    xs = [x.requires_grad_() for x in inputs(8, (32, 32, 32))]
    target = torch.randn(8, 32, dtype=torch.float64)
    out = fusion(xs)
    grads = torch.autograd.grad(loss_of(out.fused, target), list(fusion.parameters()))
    ref = unrolled_reference(fusion, xs, steps=300)
    out_r = ref([x.detach() for x in xs])
    grads_r = torch.autograd.grad(loss_of(out_r.fused, target), list(ref.parameters()))
    err = rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_r]))
    assert err <= 1e-4, err


def test_backward_leaves_no_state_on_module_and_no_hooks():
    fusion = contractive_fusion(dim=8, jac_reg=True)
    fusion.train()
    before = {k: v for k, v in vars(fusion).items() if not k.startswith("_")}
    xs = inputs(3, (8, 8))
    out = fusion(xs)
    (out.fused.sum() + out.jac_loss).backward()
    after = {k: v for k, v in vars(fusion).items() if not k.startswith("_")}
    assert before.keys() == after.keys()
    for m in fusion.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    assert all(p.grad is not None for p in fusion.parameters())


def test_jacobian_loss_estimates_frobenius_norm():
    """Hutchinson estimate against the exact ||J||_F^2 / numel from the full float64 Jacobian."""
    fusion = contractive_fusion(dim=8, jac_probes=400, **TIGHT)
    fusion.train()
    xs = inputs(2, (8, 8))
    torch.manual_seed(5)
    out = fusion(xs)
    # exact: the full Jacobian of the map at the fixed point, one block per sample
    pack_dim = 3 * 8
    pack, unpack = fusion._packers(xs[0])
    x_fuse = fusion._weighted_sum(xs)

    def f(flat):
        return pack(fusion._step(unpack(flat), xs, x_fuse, [None] * 3))

    with torch.no_grad():
        z, _, _ = solve("anderson", f, torch.zeros(2, pack_dim, dtype=torch.float64), max_iter=400, tol=1e-13, stop_mode="abs")
    J = torch.autograd.functional.jacobian(lambda zz: f(zz), z)          # (2, 24, 2, 24)
    exact = sum(J[b, :, b, :].pow(2).sum() for b in range(2)) / z.numel()
    assert abs(float(out.jac_loss.detach()) - float(exact)) / float(exact) < 0.15
    assert out.jac_loss.requires_grad
    fusion.eval()
    assert float(fusion(xs).jac_loss) == 0.0
