"""Plain (optionally damped) fixed-point iteration: z <- (1 - tau) z + tau f(z)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import ConvergenceTracker, SolverStats, should_stop


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


def _fixed_point(f, z0, *, max_iter, tol, stop_mode, tau=1.0, check_every=1, divergence_factor=1e4,
                 keep_fz=True) -> Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]:
    tracker = ConvergenceTracker(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                 divergence_factor=divergence_factor, keep_fz=keep_fz)
    z = z0
    for k in range(max_iter):
        fz = f(z)
        active = tracker.update(z, fz)
        if should_stop(tracker, k, check_every):
            break
        step = fz if tau == 1.0 else (1 - tau) * z + tau * fz
        # frozen samples keep their state; non-finite ones restart from their best iterate
        z = torch.where(active.view(-1, *([1] * (z.dim() - 1))), step, tracker.best_z)
    return tracker.finish("fixed_point_iter")
