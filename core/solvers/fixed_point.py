"""Plain (optionally damped) fixed-point iteration: z <- (1 - tau) z + tau f(z)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import ConvergenceTracker, SolverStats, checkpoint, solver_precision, worth_compacting


def fixed_point_iter(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    tau: float = 1.0,
    check_every: int = 1,
    divergence_factor: float = 1e4,
    keep_fz: bool = True,
) -> Tuple[torch.Tensor, SolverStats]:
    """Iterate f from z0 (B, D); each sample stops on its own residual. Returns (z*, stats).

    `stats.fz` is not part of the contract; the best iterate's image is returned through
    `solve()` for the layer, which saves one evaluation of f.
    """
    z, _fz, stats = _fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=tau,
                                 check_every=check_every, divergence_factor=divergence_factor, keep_fz=keep_fz)
    return z, stats


@solver_precision
def _fixed_point(f, z0, *, max_iter, tol, stop_mode, tau=1.0, check_every=1, divergence_factor=1e4,
                 keep_fz=True, restrict=None) -> Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]:
    tracker = ConvergenceTracker(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                 divergence_factor=divergence_factor, keep_fz=keep_fz, sync_ok=check_every == 1)
    z = z0
    for k in range(max_iter):
        fz = f(z)
        tracker.update(z, fz)
        n_active = checkpoint(tracker, k, check_every)
        if n_active == 0 or k == max_iter - 1:
            break
        if worth_compacting(tracker, n_active, restrict):
            keep = tracker.compact()
            f = restrict(tracker.idx)
            z, fz = z[keep], fz[keep]
        # stopped samples may go on iterating: the tracker ignores them (results are final)
        z = fz if tau == 1.0 else (1 - tau) * z + tau * fz
    return tracker.finish("fixed_point_iter")
