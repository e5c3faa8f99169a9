"""The fast paths the benchmarks rely on, against slow references.

- the O(mD) Anderson (incremental Gram row, rings, no temporaries) follows a textbook Anderson;
- dropping converged samples from f (`restrict`) gives the full-batch results;
- check_every=0 / k runs with no per-iteration host synchronisation (no .item(), bool(tensor),
  nonzero) -- proven by a fullgraph torch.compile of each solver and by counting the ops that
  synchronise in a whole DEQFusion training step -- and gives the results of the default mode;
- the solvers never write into tensors that f returned or the caller passed in.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deqfusion import DEQFusion, anderson
from deqfusion.solvers import solve
from helpers_core import contractive_fusion, inputs

SOLVERS = ["anderson", "broyden", "fixed_point_iter"]


def tanh_problem(batch=6, dim=12, seed=0, spread=True):
    """z = tanh(A_b z + c_b): nonlinear, contractive, samples of different difficulty."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64)
    rho = torch.linspace(0.3, 0.95, batch, dtype=torch.float64) if spread else torch.full((batch,), 0.8, dtype=torch.float64)
    A = rho.view(-1, 1, 1) * A / torch.linalg.matrix_norm(A, ord=2).view(-1, 1, 1)
    c = torch.randn(batch, dim, generator=g, dtype=torch.float64)

    def make(idx=None):
        Ai, ci = (A, c) if idx is None else (A[idx], c[idx])
        return lambda z: torch.tanh(torch.bmm(Ai, z.unsqueeze(-1)).squeeze(-1) + ci)

    return make


def textbook_anderson(f, x0, iters, m=6, lam=1e-4):
    """Type-II Anderson as in locuslab/deq, with the Gram matrix recomputed every step, the
    bordered system and the relative regularisation deqfusion documents. Returns all iterates."""
    X, F, xs = [], [], [x0]
    x = x0
    for _ in range(iters):
        fx = f(x)
        X.append(x)
        F.append(fx)
        X, F = X[-m:], F[-m:]
        n = len(X)
        if n == 1:
            x = fx
        else:
            G = torch.stack([fj - xj for fj, xj in zip(F, X)], dim=1)         # (B, n, D)
            H = G @ G.transpose(1, 2)
            scale = H.diagonal(dim1=1, dim2=2).mean(1)
            B = x0.shape[0]
            A = torch.zeros(B, n + 1, n + 1, dtype=torch.float64)
            A[:, 0, 1:] = 1
            A[:, 1:, 0] = 1
            A[:, 1:, 1:] = H + lam * scale.view(-1, 1, 1) * torch.eye(n, dtype=torch.float64)
            rhs = torch.zeros(B, n + 1, 1, dtype=torch.float64)
            rhs[:, 0] = 1
            alpha = torch.linalg.solve(A, rhs)[:, 1:, 0]
            x = (alpha.unsqueeze(1) @ torch.stack(F, dim=1)).squeeze(1)
        xs.append(x)
    return xs


def test_anderson_follows_the_textbook_iteration():
    make = tanh_problem(spread=False)
    f = make()
    z0 = torch.zeros(6, 12, dtype=torch.float64)
    ref = textbook_anderson(f, z0, iters=12)
    for k in (1, 2, 3, 7, 12):
        # stopping at k evaluations returns the best of the first k iterates; with tol=0 the
        # solver never stops early, so compare the residual trace instead of the best iterate
        _, stats = anderson(f, z0, max_iter=k, tol=0.0, stop_mode="abs")
        ref_res = torch.stack([(f(x) - x).norm(dim=1) for x in ref[:k]], dim=1)
        # the same iteration up to rounding in a different order: absolute differences measured
        # <= 2.3e-15 over residuals from 1.7 down to 7e-7 (relative ones grow as the residual shrinks)
        assert torch.allclose(stats.abs_trace, ref_res, rtol=0, atol=2e-14), k


@pytest.mark.parametrize("solver", SOLVERS)
def test_dropping_converged_samples_gives_full_batch_results(solver):
    make = tanh_problem(batch=9)
    z0 = torch.zeros(9, 12, dtype=torch.float64)
    kw = dict(max_iter=200, tol=1e-11, stop_mode="rel")
    z, fz, s = solve(solver, make(), z0, **kw)
    calls = collections.Counter()

    def restrict(idx):
        f_idx = make(idx)

        def counted(z):
            calls[z.shape[0]] += 1
            return f_idx(z)
        return counted

    zr, fzr, sr = solve(solver, make(), z0, restrict=restrict, **kw)
    assert len(set(s.nstep.tolist())) > 3, "samples should stop at different steps"
    assert calls and min(calls) < 9, "converged samples should have been dropped from f"
    # bitwise: each sample's arithmetic is the same in the full batch and in the working set
    for a, b in ((zr, z), (fzr, fz), (sr.nstep, s.nstep), (sr.status, s.status), (sr.rel_trace, s.rel_trace),
                 (sr.abs_lowest, s.abs_lowest)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sync_free_solve_traces_as_one_graph(solver):
    """fullgraph=True fails on any data-dependent Python branch, .item() or nonzero: a sync-free
    solve (check_every=0) compiles to one graph and gives the eager results."""
    f = tanh_problem()()
    z0 = torch.zeros(6, 12, dtype=torch.float64)

    def run(z0):
        z, _fz, st = solve(solver, f, z0, max_iter=6, tol=1e-6, stop_mode="rel", check_every=0)
        return z, st.nstep, st.status, st.abs_trace, st.rel_lowest

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")(z0)
    for a, b in zip(compiled, run(z0)):
        assert torch.equal(a, b)


class _SyncCounter(TorchDispatchMode):
    """Counts the ATen ops that copy a device value to the host (a sync on CUDA)."""

    SYNC = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNC:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("check_every", [0, 4])
def test_training_step_synchronises_only_at_check_points(check_every):
    torch.manual_seed(0)
    fusion = DEQFusion(16, 2, check_every=check_every, f_max_iter=12, b_max_iter=12)   # Jacobian term on
    xs = inputs(6, (16, 16), dtype=torch.float32)
    counter = _SyncCounter()
    with counter:
        out = fusion(xs)
        (out.fused.square().mean() + out.jac_loss).backward()
    syncs = sum(counter.count.values())
    if check_every == 0:
        assert syncs == 0, counter.count
    else:
        # forward and adjoint solve: one count per check point, plus the compactions
        checks = 2 * (12 // check_every)
        assert 0 < syncs <= 3 * checks, counter.count
    assert all(p.grad is not None for p in fusion.parameters())


@pytest.mark.parametrize("check_every", [0, 3])
def test_check_every_modes_give_the_default_results(check_every):
    """Same forward output, statistics and gradients as the default (check_every=1, which also
    drops converged samples), on a float64 instance where samples converge at different steps."""
    results = []
    for ce in (1, check_every):
        fusion = contractive_fusion(dim=16, n=2, scale=0.5, f_tol=1e-9, b_tol=1e-9, f_max_iter=120, b_max_iter=120,
                                    check_every=ce, jac_reg=False)
        scales = torch.logspace(-1, 0.5, 8, dtype=torch.float64).view(8, 1)     # easy to hard samples
        xs = [(x * scales).requires_grad_() for x in inputs(8, (16, 16))]
        g = torch.Generator().manual_seed(3)
        out = fusion(xs)
        target = torch.randn(8, 16, dtype=torch.float64, generator=g)
        grads = torch.autograd.grad((out.fused * target).sum(), xs + list(fusion.parameters()))
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert len(set(a.stats.nstep.tolist())) > 1
    assert torch.equal(a.stats.nstep, b.stats.nstep) and torch.equal(a.stats.status, b.stats.status)
    # bitwise (measured): ChannelLinear pads CPU GEMMs so that a sample's arithmetic does not
    # depend on which samples share its working set (core/blocks.py)
    assert torch.equal(b.fused.detach(), a.fused.detach())
    assert torch.equal(a.stats.backward.nstep, b.stats.backward.nstep)
    for x, y in zip(ga, gb):
        assert torch.equal(y, x)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("check_every", [1, 0])
def test_solvers_never_write_into_f_outputs_or_z0(solver, check_every):
    """f may return a tensor it keeps (a cache, a constant, its own input): the solver must not
    modify it, nor the caller's z0 -- the tracker copies or takes over only its own buffers."""
    c = torch.randn(4, 6, dtype=torch.float64)
    c_copy = c.clone()
    z0 = torch.randn(4, 6, dtype=torch.float64)
    z0_copy = z0.clone()
    z, _fz, stats = solve(solver, lambda z: c, z0, max_iter=5, tol=0.0, stop_mode="abs", check_every=check_every)
    assert torch.equal(c, c_copy) and torch.equal(z0, z0_copy)
    assert torch.allclose(z, c)

    def identity(z):
        return z                      # every point is fixed: the input itself comes back

    z, _fz, stats = solve(solver, identity, z0, max_iter=3, tol=1e-12, stop_mode="abs", check_every=check_every)
    assert torch.equal(z0, z0_copy) and torch.equal(z, z0) and stats.converged.all()


def test_sync_free_inference_is_one_graph_without_breaks():
    """check_every=0 in eval: the whole DEQFusion forward (projections, solve, fused output) is one
    torch.compile graph, which is what CUDA graphs (mode="reduce-overhead") need to capture it."""
    torch.manual_seed(0)
    fusion = DEQFusion(16, 2, in_dims=[8, 16], check_every=0, f_max_iter=4).eval()
    xs = [torch.randn(3, 8), torch.randn(3, 16)]
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda xs: fusion(xs).fused)(xs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
