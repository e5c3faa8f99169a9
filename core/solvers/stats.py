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
    start: Optional[torch.Tensor] = None    # (B,) warm_start.Start codes: cold, warm or rejected (layer solves)
    state: Optional[torch.Tensor] = None    # (B, D) the state the output was read from (f(z*)), detached: a z_init

    @property
    def converged(self) -> torch.Tensor:
        return self.status == Status.CONVERGED

    def counts(self) -> Dict[str, int]:
        """Number of samples per status, e.g. {'converged': 60, 'max_iter': 4}."""
        return {s.name.lower(): int((self.status == s).sum()) for s in Status}

    def summary(self) -> str:
        """One line, e.g. 'anderson: 60 converged, 4 at the step cap; steps max 55, worst rel residual ...'."""
        words = {"converged": "converged", "max_iter": "at the step cap", "diverged": "diverged",
                 "non_finite": "non-finite"}
        parts = [f"{v} {words.get(k, k)}" for k, v in self.counts().items() if v]
        res = self.abs_lowest if self.stop_mode == "abs" else self.rel_lowest
        worst = float(res.max()) if res.numel() else float("nan")
        starts = ""
        if self.start is not None and bool((self.start != 0).any()):
            names = ("cold", "warm", "rejected")  # warm_start.Start
            starts = "; starts " + ", ".join(f"{int((self.start == i).sum())} {n}" for i, n in enumerate(names)
                                             if bool((self.start == i).any()))
        return (f"{self.solver}: {', '.join(parts) or 'empty'}; steps max {int(self.nstep.max()) if self.nstep.numel() else 0}, "
                f"worst {self.stop_mode} residual {worst:.3g} (tol {self.tol:g}){starts}")

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


def residual_norms(z: torch.Tensor, fz: torch.Tensor, g: Optional[torch.Tensor] = None):
    """Per-sample (abs, rel) residuals of iterate z, computed in float32 or wider.

    `g = fz - z` may be passed when the solver has it already (saves a pass over the state).
    """
    wide = torch.promote_types(fz.dtype, torch.float32)
    if g is None:
        g = fz.flatten(1).to(wide) - z.flatten(1).to(wide)
    abs_r = torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=wide)
    rel_r = abs_r / (torch.linalg.vector_norm(fz.flatten(1), dim=1, dtype=wide) + _EPS)
    return abs_r, rel_r


class ConvergenceTracker:
    """Per-sample best iterate, residual traces, step counts and status for one solve.

    The tracker works on a *working set* of samples: at first the whole batch; a solver may
    call `compact()` at a point where it synchronises anyway, which drops the samples that have
    stopped (their results are final) so that f is no longer evaluated for them. Per-sample
    tensors (`best_z`, `best_fz`, `active`, ...) are in working-set order; `idx` maps working
    rows to batch rows (None while the working set is the whole batch). `finish()` returns
    everything in batch order.

    An update is a fixed sequence of tensor ops on the state's device -- no host sync -- unless
    `sync_ok` (the solver synchronises every step anyway, check_every=1): then the best iterate
    is kept by copying just the rows that improved, or by taking over the solver's buffers when
    it donates them (several times cheaper than `torch.where` with a per-row mask, which is
    what the sync-free mode uses). Samples that have stopped may go on being evaluated (until
    compacted away); the tracker ignores them, so the solver need not hold them still.
    """

    def __init__(self, z0: torch.Tensor, *, max_iter: int, tol: float, stop_mode: str,
                 divergence_factor: float, keep_fz: bool = True, sync_ok: bool = False):
        batch = z0.shape[0]
        dev = z0.device
        wide = torch.promote_types(z0.dtype, torch.float32)
        self.batch = batch
        self.tol = tol
        self.stop_mode = stop_mode
        self.divergence_factor = divergence_factor
        self.best_z = z0.clone()
        self.best_fz: Optional[torch.Tensor] = z0.clone() if keep_fz else None
        inf = torch.full((batch,), float("inf"), dtype=wide, device=dev)
        self.best_abs = inf.clone()
        self.best_rel = inf.clone()
        self.first: Optional[torch.Tensor] = None
        self._limit: Optional[torch.Tensor] = None     # divergence threshold per sample
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.long, device=dev)
        self.nstep = torch.zeros(batch, dtype=torch.long, device=dev)
        # raw residual of every evaluation; entries after a sample stops are filled in by finish()
        self.abs_trace = torch.zeros(batch, max_iter, dtype=wide, device=dev)
        self.rel_trace = torch.zeros(batch, max_iter, dtype=wide, device=dev)
        self.evals = 0
        self.idx: Optional[torch.Tensor] = None        # working row -> batch row
        self._done: Optional[Dict[str, torch.Tensor]] = None   # batch-order results of samples dropped so far
        self._sync_ok = sync_ok
        self._codes = torch.arange(len(Status), dtype=torch.long, device=dev)   # codes[s] == s, 0-d each

    @property
    def size(self) -> int:
        """Number of samples in the working set."""
        return self.best_abs.shape[0]

    def update(self, z: torch.Tensor, fz: torch.Tensor, g: Optional[torch.Tensor] = None, *,
               abs_r: Optional[torch.Tensor] = None, donate: bool = False) -> torch.Tensor:
        """Record iterate z with its image f(z) (working-set rows).

        `g = fz - z` and/or the per-sample `abs_r = ||g||` may be passed when the solver has
        them. `donate=True`: the solver will not touch z and fz again, so the tracker may keep
        their memory as its best iterate instead of copying. Returns the (working-set) mask of
        samples still active.
        """
        k = self.evals
        self.evals += 1
        if abs_r is None:
            abs_r, rel_r = residual_norms(z, fz, g)
        else:
            wide = torch.promote_types(fz.dtype, torch.float32)
            rel_r = abs_r / (torch.linalg.vector_norm(fz.flatten(1), dim=1, dtype=wide) + _EPS)
        metric = abs_r if self.stop_mode == "abs" else rel_r
        # a norm is >= 0, inf or NaN: one comparison tells finite ones; a finite abs residual
        # means finite z and f(z), hence a finite relative one
        finite = abs_r < float("inf")
        if self.first is None:
            self.first = torch.where(finite, metric, torch.ones_like(metric))
            self._limit = self.divergence_factor * self.first.clamp_min(_EPS)
        active = self.active
        live = active & finite
        best_metric = self.best_abs if self.stop_mode == "abs" else self.best_rel
        improved = live & (metric < best_metric)
        self._keep_best(improved, z, fz, donate)
        self.best_abs = torch.where(improved, abs_r, self.best_abs)
        self.best_rel = torch.where(improved, rel_r, self.best_rel)
        if k < self.abs_trace.shape[1]:
            rows = slice(None) if self.idx is None else self.idx
            self.abs_trace[rows, k] = abs_r
            self.rel_trace[rows, k] = rel_r
        self.nstep = self.nstep + active
        converged = live & (metric <= self.tol)
        nonfinite = active & ~finite
        diverged = live & ~converged & (metric > self._limit)
        codes = self._codes
        status = torch.where(converged, codes[0], self.status)
        status = torch.where(nonfinite, codes[int(Status.NON_FINITE)], status)
        self.status = torch.where(diverged, codes[int(Status.DIVERGED)], status)
        self.active = active & ~(converged | nonfinite | diverged)
        return self.active

    def _keep_best(self, improved: torch.Tensor, z: torch.Tensor, fz: torch.Tensor, donate: bool) -> None:
        """best <- z (and f(z)) on the improved rows; exact row copies, never a new (B, D) buffer
        per step unless z's own is taken over."""
        z = z.reshape(self.best_z.shape)
        if not self._sync_ok:
            # no host sync allowed: one fixed elementwise select per tensor
            mask = improved.view(-1, *([1] * (z.dim() - 1)))
            torch.where(mask, z, self.best_z, out=self.best_z)
            if self.best_fz is not None:
                torch.where(mask, fz.reshape(self.best_fz.shape), self.best_fz, out=self.best_fz)
            return
        # the solver synchronises every step anyway: copy only the rows that change, or take
        # over the donated buffers when most rows improved (the usual case)
        n = int(improved.sum())
        if n == 0:
            return
        rows = improved.nonzero().squeeze(1)
        take = donate and 2 * n >= improved.shape[0]
        if take:
            kept = (~improved).nonzero().squeeze(1)
        pairs = [(z, "best_z")]
        if self.best_fz is not None:
            pairs.append((fz.reshape(self.best_fz.shape), "best_fz"))
        for src, name in pairs:
            best = getattr(self, name)
            if n == improved.shape[0]:
                if donate:
                    setattr(self, name, src)
                else:
                    best.copy_(src)
            elif take and src.dtype == best.dtype and src.is_contiguous():
                src.index_copy_(0, kept, best.index_select(0, kept))
                setattr(self, name, src)
            else:
                best.index_copy_(0, rows, src.index_select(0, rows).to(best.dtype))

    def num_active(self) -> int:
        """Number of active samples in the working set (a host sync on CUDA)."""
        return int(self.active.sum())

    def compact(self) -> torch.Tensor:
        """Drop the stopped samples from the working set (a host sync: call it at a check point).

        Their results are final and kept aside. Returns the working rows kept, as indices into
        the old working set, so that the solver can shrink its own buffers the same way.
        """
        keep = self.active.nonzero().squeeze(1)
        leave = (~self.active).nonzero().squeeze(1)
        dev = self.active.device
        rows = self.idx if self.idx is not None else torch.arange(self.batch, device=dev)
        if self._done is None:
            d: Dict[str, torch.Tensor] = {
                "best_z": self.best_z.new_empty(self.batch, *self.best_z.shape[1:]),
                "best_abs": self.best_abs.new_empty(self.batch),
                "best_rel": self.best_rel.new_empty(self.batch),
                "status": self.status.new_empty(self.batch),
                "nstep": self.nstep.new_empty(self.batch),
            }
            if self.best_fz is not None:
                d["best_fz"] = self.best_fz.new_empty(self.batch, *self.best_fz.shape[1:])
            self._done = d
        self._flush(leave, rows[leave])
        self.idx = rows[keep]
        self.best_z = self.best_z[keep]
        if self.best_fz is not None:
            self.best_fz = self.best_fz[keep]
        for name in ("best_abs", "best_rel", "active", "status", "nstep", "first", "_limit"):
            setattr(self, name, getattr(self, name)[keep])
        return keep

    def _flush(self, work_rows: torch.Tensor, batch_rows: torch.Tensor) -> None:
        d = self._done
        d["best_z"][batch_rows] = self.best_z[work_rows]
        if self.best_fz is not None:
            d["best_fz"][batch_rows] = self.best_fz[work_rows]
        for name in ("best_abs", "best_rel", "status", "nstep"):
            d[name][batch_rows] = getattr(self, name)[work_rows]

    def finish(self, solver: str):
        """Returns (best z, f(best z) or None, SolverStats), in batch order."""
        used = min(self.evals, self.abs_trace.shape[1])
        best_z, best_fz = self.best_z, self.best_fz
        best_abs, best_rel, status, nstep = self.best_abs, self.best_rel, self.status, self.nstep
        if self._done is not None:
            d = self._done
            self._flush(torch.arange(self.size, device=self.active.device), self.idx)
            best_z, best_fz = d["best_z"], d.get("best_fz")
            best_abs, best_rel, status, nstep = d["best_abs"], d["best_rel"], d["status"], d["nstep"]
        abs_trace, rel_trace = self.abs_trace[:, :used], self.rel_trace[:, :used]
        if used:
            # after a sample's last finite residual its trace carries that value forward (inf if
            # it never had one); a non-finite evaluation is always a sample's last
            last = nstep - 1 - (status == int(Status.NON_FINITE)).long()
            cols = torch.arange(used, device=nstep.device).view(1, -1)
            after = cols > last.view(-1, 1)
            src = last.clamp_min(0).view(-1, 1)
            never = (last < 0).view(-1, 1)
            fill_abs = torch.where(never, float("inf"), abs_trace.gather(1, src))
            fill_rel = torch.where(never, float("inf"), rel_trace.gather(1, src))
            abs_trace = torch.where(after, fill_abs, abs_trace)
            rel_trace = torch.where(after, fill_rel, rel_trace)
        # a sample that never produced a finite residual reports inf, not a made-up number
        stats = SolverStats(
            nstep=nstep, abs_lowest=best_abs, rel_lowest=best_rel, status=status,
            abs_trace=abs_trace, rel_trace=rel_trace, solver=solver, stop_mode=self.stop_mode,
            tol=self.tol, num_evals=self.evals,
        )
        return best_z, best_fz, stats


def _autocast_state(device_type: str):
    """(enabled, dtype) of autocast for a device type, across torch versions."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def solver_precision(solver):
    """Run a solver's own arithmetic outside autocast, and f inside the caller's autocast.

    Under `torch.autocast`, the solver's bmm (mixing, Gram rows) would otherwise run in
    bf16/fp16 and round the state itself; only f should see the lower precision.
    """
    import functools

    @functools.wraps(solver)
    def run(f, z0, *args, **kwargs):
        enabled, dtype = _autocast_state(z0.device.type)
        if not enabled:
            return solver(f, z0, *args, **kwargs)
        dev = z0.device.type

        def inside(fn):
            def g(z):
                with torch.autocast(dev, dtype=dtype):
                    return fn(z)
            return g

        restrict = kwargs.get("restrict")
        if restrict is not None:
            kwargs["restrict"] = lambda idx: inside(restrict(idx))
        with torch.autocast(dev, enabled=False):
            return solver(inside(f), z0, *args, **kwargs)

    return run


def checkpoint(tracker: ConvergenceTracker, k: int, check_every: int) -> Optional[int]:
    """At every `check_every`-th evaluation, the number of active samples (one host sync on
    CUDA); None elsewhere and always with check_every=0 (fixed number of steps, no sync)."""
    if check_every > 0 and (k + 1) % check_every == 0:
        return tracker.num_active()
    return None


def should_stop(tracker: ConvergenceTracker, k: int, check_every: int) -> bool:
    """Early-exit test, made only every `check_every` evaluations (each one is a host sync on CUDA)."""
    return checkpoint(tracker, k, check_every) == 0


def worth_compacting(tracker: ConvergenceTracker, active: Optional[int], restrict=None) -> bool:
    """Compact when at least a fraction of the working set (and at least one sample) has stopped:
    `restrict.min_drop` if the caller set one (a restriction that costs an evaluation of f, like
    the adjoint's, wants bigger drops), else 1/8."""
    if restrict is None or active is None or active == 0:
        return False
    min_drop = getattr(restrict, "min_drop", 0.125)
    dropped = tracker.size - active
    return dropped >= max(1, int(min_drop * tracker.size))
