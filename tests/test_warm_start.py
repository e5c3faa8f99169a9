"""Warm starts (z_init, the per-sample store) and the phantom-gradient backward, against references.

References: the cold solve to tight tolerance (float64, contracting map) for warm starts; autograd
through k explicit damped steps z <- (1 - tau) z + tau f(z) from z*, written out here, for the
phantom gradient.
"""
from __future__ import annotations

import pytest
import torch

from deqfusion import DEQFusion
from deqfusion.warm_start import FixedPointStore, Start
from helpers_core import contractive_fusion, inputs, rel_err

TIGHT = dict(f_max_iter=300, f_tol=1e-12, b_max_iter=300, b_tol=1e-12)


def _solved(fusion, xs, **kw):
    with torch.no_grad():
        return fusion(xs, **kw)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point_iter"])
def test_warm_start_from_the_fixed_point_takes_one_step_and_gives_the_cold_output(solver):
    fusion = contractive_fusion(scale=0.4, f_solver=solver, **TIGHT).eval()
    xs = inputs(6, (16, 16))
    cold = _solved(fusion, xs)
    assert cold.stats.converged.all() and int(cold.stats.nstep.min()) > 5
    assert (cold.stats.start == Start.COLD).all()
    warm = _solved(fusion, xs, z_init=cold.stats.state)
    assert (warm.stats.start == Start.WARM).all() and warm.stats.converged.all()
    assert int(warm.stats.nstep.max()) <= 2, warm.stats.nstep
    assert rel_err(warm.fused, cold.fused) < 1e-11
    # a nearby start (the fixed point perturbed by 1e-3) also lands on the same fixed point, in fewer steps
    near = _solved(fusion, xs, z_init=cold.stats.state + 1e-3 * torch.randn_like(cold.stats.state))
    assert near.stats.converged.all() and float(near.stats.nstep.float().mean()) < float(cold.stats.nstep.float().mean())
    assert rel_err(near.fused, cold.fused) < 1e-10


def test_non_finite_or_useless_start_falls_back_to_zeros_and_says_so():
    fusion = contractive_fusion(scale=0.4, **TIGHT).eval()
    xs = inputs(5, (16, 16))
    cold = _solved(fusion, xs)
    bad = cold.stats.state.clone()
    bad[1] = float("nan")                  # non-finite
    bad[3] = 1e6                           # far worse than zeros (relative residual > 1)
    out = _solved(fusion, xs, z_init=bad)
    assert out.stats.start.tolist() == [Start.WARM, Start.REJECTED, Start.WARM, Start.REJECTED, Start.WARM]
    assert out.stats.converged.all() and torch.isfinite(out.fused).all()
    assert rel_err(out.fused, cold.fused) < 1e-10
    # the rejected samples ran exactly as a cold solve of them alone
    alone = _solved(fusion, [x[[1, 3]] for x in xs])
    assert out.stats.nstep[[1, 3]].tolist() == alone.stats.nstep.tolist()
    with pytest.raises(ValueError, match=r"z_init must be a \(5, 48\) tensor"):
        fusion(xs, z_init=bad[:2])


def test_store_keyed_by_ids_gives_the_same_results_in_any_batch_order():
    fusion = contractive_fusion(scale=0.4, warm_start=True, **TIGHT).eval()
    xs = inputs(8, (16, 16))
    ids = torch.arange(100, 108)
    first = _solved(fusion, xs, sample_ids=ids)
    assert (first.stats.start == Start.COLD).all() and len(fusion.warm_store) == 8
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    again = _solved(fusion, [x[perm] for x in xs], sample_ids=ids[perm])
    assert (again.stats.start == Start.WARM).all() and int(again.stats.nstep.max()) <= 2
    assert rel_err(again.fused, first.fused[perm]) < 1e-11
    # a batch mixing stored and new samples: the new ones start cold, each result its own
    part = _solved(fusion, [torch.cat([x[:2], 2 * x[:2]]) for x in xs], sample_ids=torch.tensor([100, 101, 7, 8]))
    assert part.stats.start.tolist() == [Start.WARM, Start.WARM, Start.COLD, Start.COLD]
    alone = _solved(fusion, [2 * x[:2] for x in xs])  # the same new samples without any store
    assert rel_err(part.fused[2:], alone.fused) < 1e-11


def test_store_never_leaks_between_modules_devices_or_dtypes_and_is_bounded():
    a = contractive_fusion(scale=0.4, warm_start=True, **TIGHT).eval()
    b = contractive_fusion(scale=0.4, seed=5, warm_start=True, **TIGHT).eval()
    xs = inputs(4, (16, 16))
    ids = torch.arange(4)
    _solved(a, xs, sample_ids=ids)
    assert len(a.warm_store) == 4 and len(b.warm_store) == 0       # each module owns its store
    assert (_solved(b, xs, sample_ids=ids).stats.start == Start.COLD).all()
    a32 = a.float()
    out32 = _solved(a32, [x.float() for x in xs], sample_ids=ids)
    assert (out32.stats.start == Start.COLD).all()                 # a float64 state is never reused as float32
    store = FixedPointStore(capacity=3)
    z = torch.randn(5, 4)
    store.put(torch.arange(5), z, torch.ones(5, dtype=torch.bool))
    assert len(store) == 3                                         # least recently used dropped
    got, found, _ = store.lookup(torch.arange(5), z)
    assert found.tolist() == [False, False, True, True, True] and torch.equal(got[2:], z[2:])
    store.put(torch.tensor([2]), torch.full((1, 4), float("nan")), torch.ones(1, dtype=torch.bool))
    assert not store.lookup(torch.tensor([2]), z[:1])[1].any()      # a NaN state is never kept
    with pytest.raises(ValueError, match="distinct"):
        store.lookup(torch.tensor([3, 3]), z[:2])
    with pytest.raises(ValueError, match="warm_start=True"):
        contractive_fusion(**TIGHT).eval()(xs, sample_ids=ids)


def test_store_max_age_counts_training_calls():
    fusion = contractive_fusion(scale=0.4, warm_start=True, warm_max_age=2, **TIGHT)
    fusion.train()
    xs = [x.requires_grad_() for x in inputs(3, (16, 16))]
    ids = torch.arange(3)
    starts = []
    for _ in range(2):
        starts.append(fusion(xs, sample_ids=ids).stats.start.tolist())
    assert starts == [[Start.COLD] * 3, [Start.WARM] * 3]
    fusion.warm_store.clock += 5                                   # five training calls of other samples
    assert fusion(xs, sample_ids=ids).stats.start.tolist() == [Start.REJECTED] * 3


# -- phantom gradients ------------------------------------------------------------------------------

def _damped_steps_reference(fusion, xs, k, tau):
    """z* by plain iteration from zeros (its own solve), then k damped steps from it written out,
    differentiated by autograd (no solver, no custom backward)."""
    f, readout = fusion.fixed_point_map(xs)
    with torch.no_grad():
        z0 = torch.zeros(xs[0].shape[0], fusion._num_states() * fusion.config.dim, dtype=xs[0].dtype)
        for _ in range(400):
            z0 = f(z0)
        assert float((f(z0) - z0).norm() / f(z0).norm()) < 1e-13
    z = (1 - tau) * z0 + tau * f(z0)
    for _ in range(k - 1):
        z = (1 - tau) * z + tau * f(z)
    return readout(z)


@pytest.mark.parametrize("k,tau", [(1, 1.0), (3, 1.0), (5, 0.6)])
def test_phantom_gradient_equals_autograd_through_k_damped_steps(k, tau):
    fusion = contractive_fusion(scale=0.4, backward="phantom", phantom_steps=k, phantom_tau=tau, jac_reg=False,
                                in_dims=[12, 16], **TIGHT).eval()
    xs = [x.requires_grad_() for x in inputs(4, (12, 16))]
    target = torch.randn(4, 16, dtype=torch.float64)
    out = fusion(xs)
    assert out.stats.converged.all()
    params = list(fusion.parameters())
    grads = torch.autograd.grad(((out.fused - target) ** 2).sum(), xs + params, allow_unused=True)

    xs_r = [x.detach().clone().requires_grad_() for x in xs]
    fused_r = _damped_steps_reference(fusion, xs_r, k, tau)
    grads_r = torch.autograd.grad(((fused_r - target) ** 2).sum(), xs_r + params, allow_unused=True)
    assert rel_err(out.fused.detach(), fused_r.detach()) < 1e-10
    for g, gr in zip(grads, grads_r):
        if gr is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        assert float((g - gr).abs().max()) <= 1e-10 * max(1.0, float(gr.abs().max())), (g - gr).abs().max()


def test_phantom_gradient_is_not_the_implicit_one_and_implicit_stays_default():
    """Named apart because they differ: at k=1 the phantom (JFB) gradient drops the (I - J)^-1 factor."""
    assert DEQFusion(8, 2).config.backward == "implicit"
    kw = dict(scale=0.45, jac_reg=False, **TIGHT)
    xs = inputs(4, (16, 16))
    grads = {}
    for name in ("implicit", "phantom"):
        fusion = contractive_fusion(backward=name, **kw).eval()
        loss = fusion(xs).fused.pow(2).sum()
        grads[name] = torch.autograd.grad(loss, fusion.fusion_block.fuse.weight)[0]
    assert rel_err(grads["phantom"], grads["implicit"]) > 1e-3
    with pytest.raises(ValueError, match="backward must be one of"):
        DEQFusion(8, 2, backward="ift")
    with pytest.raises(TypeError, match="Did you mean 'phantom_steps'"):
        DEQFusion(8, 2, grad=2)


# -- warm-up (pretraining with unrolled weight-tied steps) ------------------------------------------------

def test_pretrain_steps_run_unrolled_then_switch_to_the_solve():
    fusion = contractive_fusion(scale=0.4, pretrain_steps=2, pretrain_unroll=3, **TIGHT).train()
    xs = [x.requires_grad_() for x in inputs(3, (16, 16))]
    solvers = []
    for _ in range(4):
        out = fusion(xs)
        out.fused.sum().backward()
        solvers.append((out.stats.solver, int(out.stats.nstep.max())))
    assert solvers[:2] == [("unrolled", 3), ("unrolled", 3)]
    assert solvers[2][0] == "anderson" and solvers[3][0] == "anderson"
    assert int(fusion.pretrain_calls) == 2 and "pretrain_calls" in dict(fusion.named_buffers())
    with torch.no_grad():                                          # evaluation never counts or pretrains
        assert fusion.eval()(xs).stats.solver == "anderson"
