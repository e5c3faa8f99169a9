"""Anderson acceleration with per-sample stopping and a float64 least-squares step.

Type-II Anderson with window m, as in locuslab/deq and torchdeq, with three changes that their
users asked for: the Tikhonov term is relative to the sample's own Gram matrix (scale-free), the
bordered (m+1)x(m+1) systems are solved in float64 whatever the state dtype (bf16 works), and a
sample whose system is singular or non-finite takes a plain fixed-point step instead of failing.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import ConvergenceTracker, SolverStats, should_stop


def anderson(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    m: int = 6,
    lam: float = 1e-4,
    beta: float = 1.0,
    check_every: int = 1,
    divergence_factor: float = 1e4,
    keep_fz: bool = True,
) -> Tuple[torch.Tensor, SolverStats]:
    """Find z = f(z) from z0 (B, D). Returns (z*, stats); see `_anderson` for the image f(z*)."""
    z, _fz, stats = _anderson(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, beta=beta,
                              check_every=check_every, divergence_factor=divergence_factor, keep_fz=keep_fz)
    return z, stats


def _anderson(f, z0, *, max_iter, tol, stop_mode, m=6, lam=1e-4, beta=1.0, check_every=1,
              divergence_factor=1e4, keep_fz=True) -> Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]:
    if m < 1:
        raise ValueError(f"anderson: window m must be >= 1, got {m}")
    tracker = ConvergenceTracker(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                 divergence_factor=divergence_factor, keep_fz=keep_fz)
    batch = z0.shape[0]
    shape = z0.shape
    flat0 = z0.reshape(batch, -1)
    dim = flat0.shape[1]
    gram_dtype = torch.promote_types(z0.dtype, torch.float32)
    X = flat0.new_zeros(batch, m, dim)
    F = flat0.new_zeros(batch, m, dim)
    H = torch.zeros(batch, m + 1, m + 1, dtype=torch.float64, device=z0.device)
    H[:, 0, 1:] = 1
    H[:, 1:, 0] = 1
    rhs = torch.zeros(batch, m + 1, 1, dtype=torch.float64, device=z0.device)
    rhs[:, 0] = 1
    eye = torch.eye(m, dtype=torch.float64, device=z0.device)

    x = flat0
    for k in range(max_iter):
        fx = f(x.view(shape)).reshape(batch, -1)
        active = tracker.update(x.view(shape), fx.view(shape))
        if should_stop(tracker, k, check_every):
            break
        slot = k % m
        X[:, slot] = x
        F[:, slot] = fx
        n = min(k + 1, m)
        if n == 1:
            new = fx if beta == 1.0 else beta * fx + (1 - beta) * x
        else:
            G = (F[:, :n] - X[:, :n]).to(gram_dtype)
            gram = torch.bmm(G, G.transpose(1, 2)).to(torch.float64)
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
            A = H[:, : n + 1, : n + 1].clone()
            A[:, 1:, 1:] = gram + (lam * scale).view(-1, 1, 1) * eye[:n, :n]
            sol, info = torch.linalg.solve_ex(A, rhs[:, : n + 1])
            alpha = sol[:, 1:, 0]
            ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
            plain = torch.zeros_like(alpha)
            plain[:, slot] = 1.0  # the newest column: a plain fixed-point step
            alpha = torch.where(ok.view(-1, 1), alpha, plain).to(X.dtype).unsqueeze(1)
            new = torch.bmm(alpha, F[:, :n]).squeeze(1)
            if beta != 1.0:
                new = beta * new + (1 - beta) * torch.bmm(alpha, X[:, :n]).squeeze(1)
        # stopped samples hold still; a non-finite proposal restarts the sample from its best iterate
        keep = active & torch.isfinite(new).all(dim=1)
        x = torch.where(keep.view(-1, 1), new, tracker.best_z.reshape(batch, -1))
    return tracker.finish("anderson")
