"""Training without a solve (f_max_iter=0): one step of the map per call from the start state.

References: one explicit step z0 -> f(z0) (and k damped steps) written out here and differentiated
by autograd; the cold solve to tight tolerance (float64, contracting map) for where repeated
warm-started calls end up; eval_f_max_iter for the solve outside training.
"""
from __future__ import annotations

import pytest
import torch

from deqfusion import DEQFusion
from deqfusion.config import ConfigError
from deqfusion.solvers import Status
from deqfusion.warm_start import Start
from helpers_core import contractive_fusion, inputs, rel_err

CONT = dict(f_max_iter=0, eval_f_max_iter=300, f_tol=1e-12, backward="phantom", jac_reg=False)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _assert_same_grads(got, ref):
    for g, gr in zip(got, ref):
        if gr is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        assert float((g - gr).abs().max()) <= 1e-10 * max(1.0, float(gr.abs().max())), (g - gr).abs().max()


@pytest.mark.parametrize("k,tau", [(1, 1.0), (2, 0.7)])
def test_no_solve_training_is_k_damped_steps_from_the_given_state_differentiated_by_autograd(k, tau):
    fusion = contractive_fusion(scale=0.4, phantom_steps=k, phantom_tau=tau, in_dims=[12, 16], **CONT).train()
    xs = [x.requires_grad_() for x in inputs(5, (12, 16))]
    f, readout = fusion.fixed_point_map(xs)
    with torch.no_grad():                           # a state near the fixed point, as a stored one would be
        z0 = f(f(torch.zeros(5, 3 * 16, dtype=torch.float64)))
        z0 = z0 + 0.05 * torch.randn(z0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.randn(5, 16, dtype=torch.float64)
    out = fusion(xs, z_init=z0)
    params = list(fusion.parameters())
    grads = _grads(((out.fused - target) ** 2).sum(), xs + params)
    # the reference: the steps written out, plain autograd
    xs_r = [x.detach().clone().requires_grad_() for x in xs]
    f_r, readout_r = fusion.fixed_point_map(xs_r)
    z = (1 - tau) * z0 + tau * f_r(z0)
    for _ in range(k - 1):
        z = (1 - tau) * z + tau * f_r(z)
    fused_r = readout_r(z)
    grads_r = _grads(((fused_r - target) ** 2).sum(), xs_r + params)
    assert rel_err(out.fused.detach(), fused_r.detach()) < 1e-12
    _assert_same_grads(grads, grads_r)
    # its statistics are those of the step: the start state's own residual, one evaluation
    with torch.no_grad():
        fz0 = f(z0)
    rel = (fz0 - z0).norm(dim=1) / fz0.norm(dim=1)
    assert torch.allclose(out.stats.rel_lowest.double(), rel, rtol=1e-6)
    assert out.stats.nstep.tolist() == [1] * 5 and out.stats.num_evals == 1 and out.stats.solver == "one_step"
    assert (out.stats.start == Start.WARM).all()


def test_repeated_warm_started_calls_follow_the_fixed_point_and_eval_solves_with_eval_f_max_iter():
    fusion = contractive_fusion(scale=0.4, warm_start=True, **CONT)
    xs = [x.requires_grad_() for x in inputs(6, (16, 16))]
    ids = torch.arange(6)
    with torch.no_grad():
        cold = fusion.eval()(xs)                    # eval mode: a full solve (eval_f_max_iter steps)
    assert cold.stats.converged.all() and int(cold.stats.nstep.max()) > 5
    fusion.train()
    residuals, starts = [], []
    for _ in range(40):
        out = fusion(xs, sample_ids=ids)
        out.fused.sum().backward()                   # a training step's backward (weights unchanged)
        residuals.append(float(out.stats.rel_lowest.max()))
        starts.append(out.stats.start.tolist())
    assert starts[0] == [Start.COLD] * 6 and all(s == [Start.WARM] * 6 for s in starts[1:])
    # each visit is one step further along the plain iteration: the residual falls geometrically
    assert residuals[0] == pytest.approx(1.0) and residuals[-1] < 1e-8 and residuals[-1] < residuals[10] < residuals[1]
    assert rel_err(out.fused.detach(), cold.fused) < 1e-8
    assert int(out.stats.nstep.max()) == 1 and (out.stats.status == int(Status.CONVERGED)).all()   # below f_tol 1e-12


def test_a_stale_or_non_finite_stored_state_falls_back_to_zeros_and_says_so():
    fusion = contractive_fusion(scale=0.4, **CONT).train()
    xs = inputs(4, (16, 16))
    f, _ = fusion.fixed_point_map(xs)
    with torch.no_grad():
        good = f(f(torch.zeros(4, 48, dtype=torch.float64)))
    bad = good.clone()
    bad[1] = float("nan")                  # non-finite: rejected without an evaluation
    bad[2] = 1e6                           # far worse than zeros: rejected after its step, redone from zeros
    out = fusion(xs, z_init=bad)
    assert out.stats.start.tolist() == [Start.WARM, Start.REJECTED, Start.REJECTED, Start.WARM]
    assert torch.isfinite(out.fused).all() and out.stats.num_evals == 2
    with torch.no_grad():
        z0 = good.clone()
        z0[1:3] = 0
        ref = f(z0)
    _, readout = fusion.fixed_point_map(xs)
    assert rel_err(out.fused.detach(), readout(ref)) < 1e-12


def test_no_solve_needs_an_eval_solve_and_is_batch_invariant():
    with pytest.raises(ConfigError, match="eval_f_max_iter"):
        DEQFusion(8, 2, f_max_iter=0)
    with pytest.raises(ConfigError, match="eval_f_max_iter must be an int >= 1"):
        DEQFusion(8, 2, eval_f_max_iter=0)
    fusion = contractive_fusion(scale=0.4, **CONT).train()
    xs = inputs(7, (16, 16))
    z0 = torch.randn(7, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z0[::2] = 0.0                                   # some warm, some rejected (a random state is worse than zeros)
    whole = fusion(xs, z_init=z0)
    part = fusion([x[2:5] for x in xs], z_init=z0[2:5])
    assert torch.equal(whole.fused[2:5], part.fused)
    # eval mode uses eval_f_max_iter; training uses f_max_iter (here: none)
    capped = contractive_fusion(scale=0.4, f_max_iter=0, eval_f_max_iter=3, f_tol=0.0).eval()
    with torch.no_grad():
        assert int(capped(xs).stats.nstep.max()) == 3
