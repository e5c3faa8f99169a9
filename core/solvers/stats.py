"""Per-sample solver statistics and the bookkeeping every solver shares.

A solver calls `ConvergenceTracker.update` once per evaluation of f. The tracker keeps, per
sample, the best finite iterate, its residuals, the step count and a status, and decides which
samples are still iterating -- all with tensor ops on the state's device, so that the solve loop
needs no host synchronisation except where the caller asks for an early exit.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

__all__ = ["Status", "SolverStats", "ConvergenceTracker", "residual_norms", "STOP_MODES"]

STOP_MODES = ("abs", "rel")
_EPS = 1e-8


class Status(enum.IntEnum):
    """Why a sample stopped iterating."""

    CONVERGED = 0       # its residual reached the tolerance
    MAX_ITER = 1        # it ran out of iterations without reaching the tolerance
    DIVERGED = 2        # its residual grew past divergence_factor x its first residual
    NON_FINITE = 3      # f produced NaN or Inf for it; its best finite iterate is kept


@dataclass
class SolverStats:
    """What a solve did, per sample (all tensors have the batch as first dimension).

    `abs_trace[:, k]` / `rel_trace[:, k]` are the residuals of the sample's state after k+1
    evaluations of f: abs = ||f(z) - z||, rel = ||f(z) - z|| / ||f(z)||, which for plain iteration
    is ||z[k+1] - z[k]|| / ||z[k+1]|| (the paper's Table 9 and Fig. 3). Once a sample stops, its
    trace carries its final value forward.
    """

    nstep: torch.Tensor          # (B,) evaluations of f the sample used
    abs_lowest: torch.Tensor     # (B,) absolute residual of the returned iterate
    rel_lowest: torch.Tensor     # (B,) relative residual of the returned iterate
    status: torch.Tensor         # (B,) Status codes (int64)
    abs_trace: torch.Tensor      # (B, max_iter)
    rel_trace: torch.Tensor      # (B, max_iter)
    solver: str = ""
    stop_mode: str = "abs"
    tol: float = 0.0
    num_evals: int = 0           # evaluations of f made for the whole batch
    backward: Optional[SolverStats] = None  # the adjoint solve's stats, filled in when backward runs

    @property
    def converged(self) -> torch.Tensor:
        return self.status == Status.CONVERGED

    def counts(self) -> Dict[str, int]:
        """Number of samples per status, e.g. {'converged': 60, 'max_iter': 4}."""
        return {s.name.lower(): int((self.status == s).sum()) for s in Status}

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in self.counts().items() if v]
        res = self.abs_lowest if self.stop_mode == "abs" else self.rel_lowest
        worst = float(res.max()) if res.numel() else float("nan")
        return (f"{self.solver}: {', '.join(parts) or 'empty'}; steps max {int(self.nstep.max()) if self.nstep.numel() else 0}, "
                f"worst {self.stop_mode} residual {worst:.3g} (tol {self.tol:g})")

    @staticmethod
    def empty(batch: int, device: torch.device, solver: str = "none") -> SolverStats:
        z = torch.zeros(batch, device=device)
        return SolverStats(
            nstep=torch.zeros(batch, dtype=torch.long, device=device), abs_lowest=z, rel_lowest=z.clone(),
            status=torch.zeros(batch, dtype=torch.long, device=device),
            abs_trace=torch.zeros(batch, 0, device=device), rel_trace=torch.zeros(batch, 0, device=device),
            solver=solver,
        )

    @staticmethod
    def combine(stats: List[SolverStats]) -> SolverStats:
        """Concatenate the stats of solves over disjoint parts of a batch (same settings)."""
        width = max(s.abs_trace.shape[1] for s in stats)

        def pad(t: torch.Tensor) -> torch.Tensor:
            if t.shape[1] == width:
                return t
            last = t[:, -1:] if t.shape[1] else torch.zeros(t.shape[0], 1, device=t.device, dtype=t.dtype)
            return torch.cat([t, last.expand(-1, width - t.shape[1])], dim=1)

        first = stats[0]
        return SolverStats(
            nstep=torch.cat([s.nstep for s in stats]), abs_lowest=torch.cat([s.abs_lowest for s in stats]),
            rel_lowest=torch.cat([s.rel_lowest for s in stats]), status=torch.cat([s.status for s in stats]),
            abs_trace=torch.cat([pad(s.abs_trace) for s in stats]), rel_trace=torch.cat([pad(s.rel_trace) for s in stats]),
            solver=first.solver, stop_mode=first.stop_mode, tol=first.tol, num_evals=max(s.num_evals for s in stats),
        )


def residual_norms(z: torch.Tensor, fz: torch.Tensor):
    """Per-sample (abs, rel) residuals of iterate z, computed in float32 or wider."""
    wide = torch.promote_types(fz.dtype, torch.float32)
    fz_w = fz.flatten(1).to(wide)
    diff = fz_w - z.flatten(1).to(wide)
    abs_r = torch.linalg.vector_norm(diff, dim=1)
    rel_r = abs_r / (torch.linalg.vector_norm(fz_w, dim=1) + _EPS)
    return abs_r, rel_r


class ConvergenceTracker:
    """Per-sample best iterate, residual traces, step counts and status for one solve."""

    def __init__(self, z0: torch.Tensor, *, max_iter: int, tol: float, stop_mode: str,
                 divergence_factor: float, keep_fz: bool = True):
        batch = z0.shape[0]
        dev = z0.device
        wide = torch.promote_types(z0.dtype, torch.float32)
        self.tol = tol
        self.stop_mode = stop_mode
        self.divergence_factor = divergence_factor
        self.best_z = z0.clone()
        self.best_fz: Optional[torch.Tensor] = z0.clone() if keep_fz else None
        inf = torch.full((batch,), float("inf"), dtype=wide, device=dev)
        self.best_abs = inf.clone()
        self.best_rel = inf.clone()
        self.first: Optional[torch.Tensor] = None
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.long, device=dev)
        self.nstep = torch.zeros(batch, dtype=torch.long, device=dev)
        self.abs_trace = torch.zeros(batch, max_iter, dtype=wide, device=dev)
        self.rel_trace = torch.zeros(batch, max_iter, dtype=wide, device=dev)
        self.evals = 0

    def update(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        """Record iterate z with its image f(z); returns the (B,) mask of samples still active."""
        k = self.evals
        self.evals += 1
        abs_r, rel_r = residual_norms(z, fz)
        metric = abs_r if self.stop_mode == "abs" else rel_r
        finite = torch.isfinite(metric)
        if self.first is None:
            self.first = torch.where(finite, metric, torch.ones_like(metric))
        active = self.active
        best_metric = self.best_abs if self.stop_mode == "abs" else self.best_rel
        improved = active & finite & (metric < best_metric)
        mask = improved.view(-1, *([1] * (z.dim() - 1)))
        self.best_z = torch.where(mask, z, self.best_z)
        if self.best_fz is not None:
            self.best_fz = torch.where(mask, fz, self.best_fz)
        self.best_abs = torch.where(improved, abs_r, self.best_abs)
        self.best_rel = torch.where(improved, rel_r, self.best_rel)
        if k < self.abs_trace.shape[1]:
            never = torch.full_like(abs_r, float("inf"))
            prev_abs = self.abs_trace[:, k - 1] if k else never
            prev_rel = self.rel_trace[:, k - 1] if k else never
            self.abs_trace[:, k] = torch.where(active & finite, abs_r, prev_abs)
            self.rel_trace[:, k] = torch.where(active & finite, rel_r, prev_rel)
        self.nstep = torch.where(active, torch.full_like(self.nstep, k + 1), self.nstep)
        converged = active & finite & (metric <= self.tol)
        nonfinite = active & ~finite
        diverged = active & finite & ~converged & (metric > self.divergence_factor * self.first.clamp_min(_EPS))
        self.status = torch.where(converged, torch.full_like(self.status, int(Status.CONVERGED)), self.status)
        self.status = torch.where(nonfinite, torch.full_like(self.status, int(Status.NON_FINITE)), self.status)
        self.status = torch.where(diverged, torch.full_like(self.status, int(Status.DIVERGED)), self.status)
        self.active = active & ~(converged | nonfinite | diverged)
        return self.active

    def finish(self, solver: str):
        """Returns (best z, f(best z) or None, SolverStats)."""
        used = min(self.evals, self.abs_trace.shape[1])
        abs_trace = self.abs_trace[:, :used]
        rel_trace = self.rel_trace[:, :used]
        # a sample that never produced a finite residual reports inf, not a made-up number
        stats = SolverStats(
            nstep=self.nstep, abs_lowest=self.best_abs, rel_lowest=self.best_rel, status=self.status,
            abs_trace=abs_trace, rel_trace=rel_trace, solver=solver, stop_mode=self.stop_mode,
            tol=self.tol, num_evals=self.evals,
        )
        return self.best_z, self.best_fz, stats


def should_stop(tracker: ConvergenceTracker, k: int, check_every: int) -> bool:
    """Early-exit test, made only every `check_every` evaluations (each one is a host sync on CUDA)."""
    return check_every > 0 and (k + 1) % check_every == 0 and not bool(tracker.active.any())
