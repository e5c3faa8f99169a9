"""Solvers against independent references: a linear fixed point solved exactly, per-sample semantics."""
from __future__ import annotations

import pytest
import torch

from deqfusion import Status, anderson, broyden, fixed_point_iter
from helpers_core import one_thread  # noqa: F401  (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = [anderson, broyden, fixed_point_iter]


def linear_problem(batch=6, dim=20, rho=0.8, seed=0):
    """f(z) = A_b z + c_b with spectral norm rho < 1 per sample; z* = (I - A)^-1 c exactly."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2).view(-1, 1, 1)
    c = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, c.unsqueeze(-1)).squeeze(-1)
    return (lambda z: torch.bmm(A, z.unsqueeze(-1)).squeeze(-1) + c), exact


def within_contraction_bound(z, exact, abs_residual, rho, rounding=1e-12):
    """A contraction with ||A|| = rho has ||z - z*|| <= ||f(z) - z|| / (1 - rho): the tightest
    bound the reported residual allows, attained by plain iteration on the slowest mode (measured
    err / bound = 0.99995-1.00004 there). `rounding` covers the float64 solve for z* (cond 50,
    ||z*|| ~ 50: ~3e-13)."""
    err = (z.double() - exact).norm(dim=1)
    return bool((err <= abs_residual.double() / (1 - rho) + rounding).all())


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_solver_reaches_exact_fixed_point(solver, stop_mode):
    f, exact = linear_problem()
    z, stats = solver(f, torch.zeros_like(exact), max_iter=300, tol=1e-11, stop_mode=stop_mode)
    assert (stats.status == Status.CONVERGED).all(), stats.summary()
    assert within_contraction_bound(z, exact, stats.abs_lowest, rho=0.8)
    res = stats.abs_lowest if stop_mode == "abs" else stats.rel_lowest
    assert (res <= 1e-11).all()
    # the reported residual is the returned iterate's own
    assert torch.allclose(stats.abs_lowest, (f(z) - z).norm(dim=1), rtol=1e-12, atol=0)
    # the trace ends at the reported residual and has one entry per evaluation
    assert stats.abs_trace.shape == (exact.shape[0], stats.num_evals)
    idx = (stats.nstep - 1).clamp_min(0)
    assert torch.allclose(stats.abs_trace.gather(1, idx.view(-1, 1)).squeeze(1), stats.abs_lowest)


def slow_linear_problem():
    """Symmetric A with eigenvalues in [-0.5, 0.98] (||A|| = 0.98): plain iteration needs ~1000 steps for 1e-10."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(4, 20, 20, generator=g, dtype=torch.float64))
    A = q @ torch.diag_embed(torch.linspace(-0.5, 0.98, 20, dtype=torch.float64).expand(4, 20)) @ q.transpose(1, 2)
    c = torch.randn(4, 20, generator=g, dtype=torch.float64)
    f = lambda z: torch.bmm(A, z.unsqueeze(-1)).squeeze(-1) + c  # noqa: E731
    exact = torch.linalg.solve(torch.eye(20, dtype=torch.float64) - A, c.unsqueeze(-1)).squeeze(-1)
    return f, exact


def test_acceleration_beats_plain_iteration():
    """Spectral radius 0.98: plain iteration needs ~1000 steps for 1e-10, Anderson/Broyden far fewer."""
    f, exact = slow_linear_problem()
    steps = {}
    for solver in SOLVERS:
        z, stats = solver(f, torch.zeros_like(exact), max_iter=2000, tol=1e-10)
        assert stats.converged.all(), (solver.__name__, stats.summary())
        assert within_contraction_bound(z, exact, stats.abs_lowest, rho=0.98)
        steps[solver.__name__] = int(stats.nstep.max())
    assert steps["anderson"] < steps["fixed_point_iter"] / 2, steps
    assert steps["broyden"] < steps["fixed_point_iter"] / 2, steps


def test_broyden_converges_after_its_memory_ring_wraps():
    """Needs more steps than the memory holds (30 terms, ~50 steps). Before Broyden restarted from -I
    on a full memory, its ring overwrote the oldest term while keeping the newer ones built on it:
    abs residual 1.5e-10..5.9e-9 near step 40, then 5e4, every sample DIVERGED."""
    f, exact = slow_linear_problem()
    z, stats = broyden(f, torch.zeros_like(exact), max_iter=300, tol=1e-12, memory=30)
    assert stats.converged.all(), stats.summary()
    assert int(stats.nstep.min()) > 30, "the memory should have filled up (measured 52-55 steps)"
    assert within_contraction_bound(z, exact, stats.abs_lowest, rho=0.98)


def test_broyden_converges_while_its_memory_holds_every_step():
    """The control for the test above: the same problem with a ring that never wraps."""
    f, exact = slow_linear_problem()
    z, stats = broyden(f, torch.zeros_like(exact), max_iter=300, tol=1e-12, memory=60)
    assert stats.converged.all() and int(stats.nstep.max()) <= 60, stats.summary()
    assert within_contraction_bound(z, exact, stats.abs_lowest, rho=0.98)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_per_sample_stopping_is_batch_invariant(solver):
    """A sample's result and step count do not depend on the other samples of the batch."""
    f_all, exact = linear_problem(batch=8, rho=0.9)
    z_all, s_all = solver(f_all, torch.zeros_like(exact), max_iter=200, tol=1e-8)
    for i in (0, 5):
        def f_one(z, i=i):
            padded = torch.zeros_like(exact)
            padded[i] = z[0]
            return f_all(padded)[i:i + 1]
        z_one, s_one = solver(f_one, torch.zeros_like(exact[i:i + 1]), max_iter=200, tol=1e-8)
        assert torch.allclose(z_one[0], z_all[i], rtol=1e-12, atol=1e-13)
        assert int(s_one.nstep[0]) == int(s_all.nstep[i])
    assert len(set(s_all.nstep.tolist())) > 1, "samples should stop at different steps"


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_converged_sample_stops_changing(solver):
    """An easy sample that converges early keeps its value while a hard one goes on iterating."""
    scale = torch.tensor([0.1, 0.99], dtype=torch.float64).view(2, 1)
    x = torch.ones(2, 4, dtype=torch.float64)

    def f(z):
        return scale * torch.tanh(z) + x

    z, stats = solver(f, torch.zeros(2, 4, dtype=torch.float64), max_iter=300, tol=1e-9)
    assert stats.nstep[0] < stats.nstep[1]
    z_short, _ = solver(f, torch.zeros(2, 4, dtype=torch.float64), max_iter=int(stats.nstep[0]), tol=1e-9)
    assert torch.equal(z_short[0], z[0])


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_check_every_gives_identical_results(solver):
    f, exact = linear_problem(batch=5, rho=0.9)
    z1, s1 = solver(f, torch.zeros_like(exact), max_iter=100, tol=1e-8, check_every=1)
    z7, s7 = solver(f, torch.zeros_like(exact), max_iter=100, tol=1e-8, check_every=7)
    z0, s0 = solver(f, torch.zeros_like(exact), max_iter=100, tol=1e-8, check_every=0)   # fixed count, no early exit
    for z, s in ((z7, s7), (z0, s0)):
        assert torch.equal(z, z1)
        assert torch.equal(s.nstep, s1.nstep)
        assert torch.equal(s.status, s1.status)
    assert s0.num_evals == 100 and s1.num_evals < 100


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_no_fixed_point_is_reported_not_hidden(solver):
    """z^2 + 1 has no real fixed point: every sample ends diverged/max-iter/non-finite, output finite."""
    def f(z):
        return z * z + 1.0

    z, stats = solver(f, torch.zeros(3, 5, dtype=torch.float64), max_iter=60, tol=1e-6)
    assert torch.isfinite(z).all()
    assert not stats.converged.any()
    assert set(stats.status.tolist()) <= {Status.MAX_ITER, Status.DIVERGED, Status.NON_FINITE}
    assert torch.isfinite(stats.abs_lowest).all()


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_nan_in_one_sample_stays_in_that_sample(solver):
    """f returns NaN for sample 1 after a few steps: it is flagged non-finite, keeps its best finite
    iterate, and the other samples converge exactly as they would alone."""
    calls = {"n": 0}
    f_lin, exact = linear_problem(batch=3, rho=0.5)

    def f(z):
        calls["n"] += 1
        out = f_lin(z)
        if calls["n"] >= 4:
            out = out.clone()
            out[1] = float("nan")
        return out

    z, stats = solver(f, torch.zeros_like(exact), max_iter=200, tol=1e-10)
    assert torch.isfinite(z).all()
    assert int(stats.status[1]) == Status.NON_FINITE
    assert (stats.status[[0, 2]] == Status.CONVERGED).all()
    assert within_contraction_bound(z[[0, 2]], exact[[0, 2]], stats.abs_lowest[[0, 2]], rho=0.5)


def test_divergence_detected():
    def f(z):
        return 3.0 * z + 1.0          # fixed point -0.5 exists but plain iteration runs away

    z, stats = fixed_point_iter(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=100, tol=1e-8,
                                divergence_factor=1e3)
    assert (stats.status == Status.DIVERGED).all()
    assert torch.isfinite(z).all() and z.abs().max() < 1e3


def test_anderson_bf16_state_uses_wide_solve():
    """A bf16 state works (torch.linalg.solve has no bf16 kernel): the small system is solved in float64."""
    f, exact = linear_problem(batch=4, dim=16, rho=0.5)
    fb = lambda z: f(z.double()).to(torch.bfloat16)  # noqa: E731
    z, stats = anderson(fb, torch.zeros(4, 16, dtype=torch.bfloat16), max_iter=40, tol=5e-2)
    assert z.dtype == torch.bfloat16 and stats.converged.all(), stats.summary()
    # the contraction bound, with f's output rounded to bf16 (relative 2^-8) as part of the
    # residual; measured errors 0.02-0.05 against bounds 0.065-0.12
    assert within_contraction_bound(z, exact, stats.abs_lowest.double() + 2 ** -8 * exact.norm(dim=1), rho=0.5)


def test_singular_anderson_system_falls_back():
    """A constant map makes every residual column identical (singular Gram): no error, exact answer."""
    c = torch.randn(3, 8, dtype=torch.float64)
    z, stats = anderson(lambda z: c.clone(), torch.zeros(3, 8, dtype=torch.float64), max_iter=20, tol=1e-12, lam=0.0)
    assert torch.allclose(z, c) and stats.converged.all()
