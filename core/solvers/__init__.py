"""Fixed-point solvers: plain functions `(f, z0, *, max_iter, tol, stop_mode, ...) -> (z, stats)`.

`solve()` is the single entry point the layer uses: it picks a solver by name and also returns
f(z*) from the solver's own bookkeeping, which saves one evaluation of f in eval mode.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .anderson import _anderson, anderson
from .broyden import _broyden, broyden
from .fixed_point import _fixed_point, fixed_point_iter
from .stats import STOP_MODES, ConvergenceTracker, SolverStats, Status, residual_norms

__all__ = [
    "anderson", "broyden", "fixed_point_iter", "solve", "SOLVERS",
    "SolverStats", "Status", "ConvergenceTracker", "residual_norms", "STOP_MODES",
]

SOLVERS: Dict[str, Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]]] = {
    "anderson": _anderson,
    "broyden": _broyden,
    "fixed_point_iter": _fixed_point,
}


def solve(name: str, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **kwargs: Any):
    """Run solver `name`; returns (z*, f(z*) or None, stats).

    Optional `restrict(idx) -> f_idx`: f for the samples `idx` (a LongTensor of batch rows)
    alone, for maps that treat samples independently. With it, the solver drops stopped
    samples from the batch at its check points (every `check_every` steps; never with
    check_every=0) and evaluates f only for those still iterating; the results are those of
    the full-batch solve.
    """
    try:
        fn = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    if kwargs.get("stop_mode", "abs") not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {kwargs['stop_mode']!r}")
    return fn(f, z0, **kwargs)
