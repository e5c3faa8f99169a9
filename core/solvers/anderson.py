"""Anderson acceleration with per-sample stopping and a float64 least-squares step.

Type-II Anderson with window m, as in locuslab/deq and torchdeq, with three changes that their
users asked for: the Tikhonov term is relative to the sample's own Gram matrix (scale-free), the
small least-squares systems (their bordered (m+1)x(m+1) form, with the constraint eliminated) are
solved in float64 whatever the state dtype (bf16 works), and a sample whose system is singular or
non-finite takes a plain fixed-point step instead of failing.

Cost per iteration, besides the one evaluation of f, is O(m D) per sample and allocates no
(B, m, D) temporary: the window keeps f(x_j) and the residuals g_j = f(x_j) - x_j in two
preallocated ring buffers, and the Gram matrix G G^T is updated by its newest row only (the
m inner products of the new residual) instead of being recomputed (O(m^2 D)). Mixing with
beta < 1 uses sum_j a_j x_j = sum_j a_j f_j - sum_j a_j g_j, so no history of x is kept.

With `restrict` (see `solve`), samples that have stopped are dropped from the batch at check
points, so f is evaluated only for the samples still iterating.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import ConvergenceTracker, SolverStats, checkpoint, solver_precision, worth_compacting


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


@solver_precision
def _anderson(f, z0, *, max_iter, tol, stop_mode, m=6, lam=1e-4, beta=1.0, check_every=1,
              divergence_factor=1e4, keep_fz=True, restrict=None) -> Tuple[torch.Tensor, Optional[torch.Tensor], SolverStats]:
    if m < 1:
        raise ValueError(f"anderson: window m must be >= 1, got {m}")
    tracker = ConvergenceTracker(z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                 divergence_factor=divergence_factor, keep_fz=keep_fz, sync_ok=check_every == 1)
    batch = z0.shape[0]
    rest = z0.shape[1:]
    x = z0.reshape(batch, -1)
    dim = x.shape[1]
    dev = z0.device
    # the m inner products per step run in the state dtype when it is float32/64 (bmm has no
    # accumulate-wide option); a half-precision history is widened for them
    dot_dtype = torch.promote_types(z0.dtype, torch.float32)
    Fh = x.new_empty(batch, m, dim)          # f(x_j)            (slot j is read only once written)
    Gh = x.new_empty(batch, m, dim)          # g_j = f(x_j) - x_j
    home = (Fh, Gh)                          # the full-size buffers the rings are views of
    spare = None                             # and their second home when the batch shrinks
    gram = torch.zeros(batch, m, m, dtype=torch.float64, device=dev)
    ones = torch.ones(m, 1, dtype=torch.float64, device=dev)
    onehot = torch.eye(m, dtype=torch.float64, device=dev)

    for k in range(max_iter):
        w = x.shape[0]
        fx = f(x.view(w, *rest)).reshape(w, -1)
        slot = k % m
        g = Gh[:, slot]
        if check_every == 1:
            torch.sub(fx, x, out=g)           # straight into the ring
        else:
            g.copy_(fx - x)                   # torch.compile cannot trace out= into a strided view
        Fh[:, slot] = fx
        n = min(k + 1, m)
        # newest row/column of the Gram matrix: <g_j, g> for the n stored residuals, as
        # (1, D) @ (D, n) per sample (MKL's batched (n, D) @ (D, 1) is several times slower);
        # its diagonal entry is ||g||^2, the residual, which saves the tracker a pass
        if Gh.dtype == dot_dtype:
            row = torch.bmm(g.unsqueeze(1), Gh[:, :n].transpose(1, 2)).squeeze(1)
        else:
            row = torch.bmm(g.to(dot_dtype).unsqueeze(1), Gh[:, :n].to(dot_dtype).transpose(1, 2)).squeeze(1)
        abs_r = row[:, slot].clamp_min(0).sqrt()
        row = row.to(torch.float64)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        # x and f(x) are not used again once g and the F ring hold them (the first step, which
        # moves to f(x), and damped mixing excepted): the tracker may keep them as its best
        tracker.update(x.view(w, *rest), fx.view(w, *rest), g, abs_r=abs_r, donate=beta == 1.0 and k > 0)
        n_active = checkpoint(tracker, k, check_every)
        if n_active == 0 or k == max_iter - 1:
            break
        if worth_compacting(tracker, n_active, restrict):
            keep = tracker.compact()
            f = restrict(tracker.idx)
            x, fx = x.index_select(0, keep), fx.index_select(0, keep)
            # the rings move into a second pair of buffers (and back, next time): memory that
            # is already mapped, where a fresh (B, m, D) allocation would page-fault afresh
            if spare is None:
                spare = (torch.empty_like(home[0]), torch.empty_like(home[1]))
            rows = keep.shape[0]
            Fh = torch.index_select(Fh, 0, keep, out=spare[0][:rows])
            Gh = torch.index_select(Gh, 0, keep, out=spare[1][:rows])
            home, spare = spare, home
            gram = gram.index_select(0, keep)
            w = x.shape[0]
        if n == 1:
            new = fx if beta == 1.0 else beta * fx + (1 - beta) * x
        else:
            # min ||sum_j a_j g_j|| subject to sum_j a_j = 1:  a = H^-1 1 / (1^T H^-1 1) with
            # H = G G^T + lam * mean(diag) * I (the bordered system of locuslab/deq, eliminated)
            A = gram[:, :n, :n].clone()
            diag = A.diagonal(dim1=1, dim2=2)
            diag.add_(diag.mean(dim=1, keepdim=True).clamp_min(1e-30), alpha=lam)
            y, info = torch.linalg.solve_ex(A, ones[:n].expand(w, n, 1))
            y = y.squeeze(2)
            alpha = y / y.sum(dim=1, keepdim=True)
            ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
            # a failed system takes a plain fixed-point step: weight 1 on the newest column
            alpha = torch.where(ok.view(-1, 1), alpha, onehot[slot, :n]).to(Fh.dtype).unsqueeze(1)
            new = torch.bmm(alpha, Fh[:, :n]).squeeze(1)
            if beta != 1.0:
                new = new - (1 - beta) * torch.bmm(alpha, Gh[:, :n]).squeeze(1)
        # Stopped samples are left to iterate on: the tracker ignores them (their results are
        # final) and f treats samples independently, so this costs nothing but their share of
        # f -- which `restrict` removes. An active sample's window and coefficients are finite
        # (a non-finite f(x) stops the sample), so its proposal is finite barring overflow, and
        # an overflow shows up as a non-finite f(x) at the next step.
        x = new
    return tracker.finish("anderson")
