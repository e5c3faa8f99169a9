"""Limited-memory ("good") Broyden with per-sample stopping.

The inverse Jacobian of g(z) = f(z) - z is approximated as -I + sum_j u_j v_j^T with at most
`memory` rank-one terms, so memory is bounded by `memory`, not by max_iter (locuslab/deq issue
#28). When all `memory` terms are in use the estimate restarts from -I: overwriting the oldest
term, as a ring would, leaves the newer terms (each built on it) inconsistent, and the iteration
then diverges. Full steps, no line search. Only the filled part of the ring enters
the products, and a sample's history is forgotten by masking its terms (a (B, memory) mask),
not by rewriting the (B, memory, D) buffers.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import ConvergenceTracker, SolverStats, checkpoint, solver_precision, worth_compacting


def _matvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(-I + U^T V) x for each sample: U, V (B, m, D), x (B, D); `valid` (B, m) masks terms."""
    coeff = torch.bmm(V, x.unsqueeze(2))              # (B, m, 1): v_j . x
    if valid is not None:
        coeff = coeff * valid.unsqueeze(2)
    return -x + torch.bmm(U.transpose(1, 2), coeff).squeeze(2)


def _rmatvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x^T (-I + U^T V) for each sample."""
    coeff = torch.bmm(U, x.unsqueeze(2))              # (B, m, 1): u_j . x
    if valid is not None:
        coeff = coeff * valid.unsqueeze(2)
    return -x + torch.bmm(V.transpose(1, 2), coeff).squeeze(2)


def broyden(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    memory: int = 30,
    check_every: int = 1,
    divergence_factor: float = 1e4,
    keep_fz: bool = True,
) -> Tuple[torch.Tensor, SolverStats]:
    """Find z = f(z) from z0 (B, D) with Broyden's method. Returns (z*, stats)."""
    z, _fz, stats = _broyden(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, memory=memory,
                             check_every=check_every, divergence_factor=divergence_factor, keep_fz=keep_fz)
    return z, stats


@solver_precision
def _broyden(f, z0, *, max_iter, tol, stop_mode, memory=30, check_every=1, divergence_factor=1e4,
             keep_fz=True, restrict=None) -> Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]:
    if memory < 1:
        raise ValueError(f"broyden: memory must be >= 1, got {memory}")
    tracker = ConvergenceTracker(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                 divergence_factor=divergence_factor, keep_fz=keep_fz, sync_ok=check_every == 1)
    batch = z0.shape[0]
    rest = z0.shape[1:]
    x = z0.reshape(batch, -1)
    U = x.new_zeros(batch, memory, x.shape[1])
    V = x.new_zeros(batch, memory, x.shape[1])
    valid = x.new_zeros(batch, memory)               # 1 where a ring slot holds a live term
    fx = f(x.view(batch, *rest)).reshape(batch, -1)
    gx = fx - x
    active = tracker.update(x.view(batch, *rest), fx.view(batch, *rest), gx)
    update = gx                                        # -(-I) g: the first step is a plain one
    tiny = torch.finfo(x.dtype).tiny ** 0.5
    for k in range(1, max_iter):
        n_active = checkpoint(tracker, k - 1, check_every)
        if n_active == 0:
            break
        if worth_compacting(tracker, n_active, restrict):
            keep = tracker.compact()
            f = restrict(tracker.idx)
            x, gx, update, U, V, valid = x[keep], gx[keep], update[keep], U[keep], V[keep], valid[keep]
            active = tracker.active
        w = x.shape[0]
        step_ok = active & torch.isfinite(update).all(dim=1)
        x_new = torch.where(step_ok.view(-1, 1), x + update, x)
        fx_new = f(x_new.view(w, *rest)).reshape(w, -1)
        gx_new = fx_new - x_new
        active = tracker.update(x_new.view(w, *rest), fx_new.view(w, *rest), gx_new)
        used = min(k - 1, memory)                      # ring slots filled so far
        slot = (k - 1) % memory
        if k - 1 >= memory and slot == 0:
            # the ring is full: restart from -I rather than overwrite the oldest term, on which
            # every newer term was built (an estimate missing it is inconsistent and diverges)
            valid = torch.zeros_like(valid)
        Uu, Vu, vu = U[:, :used], V[:, :used], valid[:, :used]
        dx = x_new - x
        dg = gx_new - gx
        vT = _rmatvec(Uu, Vu, dx, vu)
        denom = (vT * dg).sum(dim=1, keepdim=True)
        u = (dx - _matvec(Uu, Vu, dg, vu)) / torch.where(denom.abs() > tiny, denom, torch.ones_like(denom))
        good = (denom.abs() > tiny).squeeze(1) & step_ok & torch.isfinite(u).all(dim=1) & torch.isfinite(vT).all(dim=1)
        U[:, slot] = torch.where(good.view(-1, 1), u, torch.zeros_like(u))
        V[:, slot] = torch.where(good.view(-1, 1), vT, torch.zeros_like(vT))
        # a sample whose new image is non-finite falls back to its best iterate and forgets its history
        finite = torch.isfinite(gx_new).all(dim=1)
        valid[:, slot] = 1
        valid = valid * finite.view(-1, 1).to(valid.dtype)
        x = torch.where(finite.view(-1, 1), x_new, tracker.best_z.reshape(w, -1))
        gx = torch.where(finite.view(-1, 1), gx_new, tracker.best_fz.reshape(w, -1) - x
                         if tracker.best_fz is not None else torch.zeros_like(gx_new))
        filled = min(k, memory)
        update = -_matvec(U[:, :filled], V[:, :filled], gx, valid[:, :filled])
    return tracker.finish("broyden")
