"""Warm starts: begin a solve from an earlier fixed point of the same sample instead of zeros.

A training loop that revisits its samples (MM-Dynamics trains full-batch: every epoch solves for
the same samples again) can start each solve where that sample's last one ended; with small
parameter updates between visits the solver then needs a step or two instead of a dozen.

`FixedPointStore` keeps one state per sample id, for one `DEQFusion` (the layer owns it, so no
state leaks between modules), on one device and dtype (a lookup with another device, dtype or
state width is a miss, never a conversion), bounded in memory (least recently used entries are
dropped beyond `capacity`), and never holds a non-finite state. `choose_start` decides per
sample whether a given state is used: it is not when it is non-finite, older than `max_age`
training calls, or no better than zeros (its relative residual ‖f(z)−z‖/‖f(z)‖ is above 1, which
is the relative residual of the zero start). Each decision is the sample's own, so results stay
per-sample and batch-invariant; `SolverStats.start` records it (cold, warm, rejected).
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["Start", "FixedPointStore", "choose_start", "first_call_returns"]


class Start(enum.IntEnum):
    """Where a sample's solve began."""

    COLD = 0       # zeros: no earlier state was given
    WARM = 1       # the given earlier state
    REJECTED = 2   # a state was given but not used (non-finite, too old, or no better than zeros)


class FixedPointStore:
    """Per-sample fixed points keyed by the caller's sample ids (ints), for one layer.

    States live in one (rows, D) tensor on the states' device (grown by doubling up to `capacity`
    rows); an ordered map id -> row keeps the least recently used entry first, to be dropped when full.
    """

    def __init__(self, capacity: int = 65536, max_age: int = 0):
        if capacity < 1:
            raise ValueError(f"warm-start store capacity must be >= 1, got {capacity}")
        if max_age < 0:
            raise ValueError(f"warm-start max_age must be >= 0 (0 = no limit), got {max_age}")
        self.capacity = int(capacity)
        self.max_age = int(max_age)
        self.clock = 0                                      # training calls seen (the unit of max_age)
        self._rows: OrderedDict[int, int] = OrderedDict()  # sample id -> row of _data, oldest use first
        self._free: List[int] = []
        self._data: Optional[torch.Tensor] = None
        self._stamp: Optional[torch.Tensor] = None          # clock at which each row was written

    def __len__(self) -> int:
        return len(self._rows)

    def tag(self) -> Optional[Tuple[torch.device, torch.dtype, int]]:
        return None if self._data is None else (self._data.device, self._data.dtype, self._data.shape[1])

    def clear(self) -> None:
        self._rows.clear()
        self._free = []
        self._data = self._stamp = None

    @staticmethod
    def _keys(ids) -> List[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dim() != 1:
                raise TypeError("sample_ids must be a 1-d integer tensor (or a list of ints), one id per sample")
            keys = [int(i) for i in ids.tolist()]
        else:
            keys = [int(i) for i in ids]
        if len(set(keys)) != len(keys):
            raise ValueError("sample_ids must be distinct within a batch")
        return keys

    def lookup(self, ids, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states (B, D) like `like`, found (B,) bool, age (B,) long) for the ids; misses are zeros."""
        keys = self._keys(ids)
        batch = like.shape[0]
        if len(keys) != batch:
            raise ValueError(f"got {len(keys)} sample ids for a batch of {batch}")
        found = torch.zeros(batch, dtype=torch.bool, device=like.device)
        age = torch.zeros(batch, dtype=torch.long, device=like.device)
        out = torch.zeros_like(like)
        if self.tag() != (like.device, like.dtype, like.shape[1]):
            return out, found, age              # another device, dtype or width: a miss
        hit, src = [], []
        for i, k in enumerate(keys):
            row = self._rows.get(k)
            if row is not None:
                self._rows.move_to_end(k)
                hit.append(i)
                src.append(row)
        if hit:
            where = torch.tensor(hit, device=like.device)
            rows = torch.tensor(src, device=like.device)
            out.index_copy_(0, where, self._data.index_select(0, rows))
            found[where] = True
            age[where] = self.clock - self._stamp.index_select(0, rows)
        return out, found, age

    def put(self, ids, states: torch.Tensor, keep: torch.Tensor) -> None:
        """Store states (B, D) of the samples where `keep` (B,) is True; the others lose their entry."""
        keys = self._keys(ids)
        states = states.detach()
        if self.tag() != (states.device, states.dtype, states.shape[1]):
            self.clear()                          # a new device, dtype or width starts afresh
            self._data = states.new_zeros(0, states.shape[1])
            self._stamp = torch.zeros(0, dtype=torch.long, device=states.device)
        keep_list = (keep & torch.isfinite(states).all(dim=1)).tolist()
        rows, src = [], []
        for i, k in enumerate(keys):
            if not keep_list[i]:
                row = self._rows.pop(k, None)
                if row is not None:
                    self._free.append(row)
                continue
            row = self._rows.get(k)
            if row is None:
                row = self._take_row()
            self._rows[k] = row
            self._rows.move_to_end(k)
            rows.append(row)
            src.append(i)
        if rows:
            r = torch.tensor(rows, device=states.device)
            self._data.index_copy_(0, r, states.index_select(0, torch.tensor(src, device=states.device)))
            self._stamp[r] = self.clock

    def _take_row(self) -> int:
        if self._free:
            return self._free.pop()
        n = self._data.shape[0]
        if n < self.capacity:                     # grow (doubling, up to capacity)
            grow = min(self.capacity, max(2 * n, 16)) - n
            self._data = torch.cat([self._data, self._data.new_zeros(grow, self._data.shape[1])])
            self._stamp = torch.cat([self._stamp, self._stamp.new_zeros(grow)])
            self._free = list(range(n + grow - 1, n, -1))
            return n
        _, row = self._rows.popitem(last=False)   # full: drop the least recently used entry
        return row


def choose_start(f: Callable[[torch.Tensor], torch.Tensor], restrict, given: torch.Tensor, z: torch.Tensor,
                 usable: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: start from `z` where `usable` and it is finite and better than zeros, else zeros.

    Returns (z0, f(z0), start codes). `given` marks samples for which a state was offered at all.
    Costs one evaluation of f for the batch (which the solver then reuses as its first step), plus
    one on the rejected samples alone to get f(0) for them.
    """
    finite = torch.isfinite(z).all(dim=1)
    z0 = torch.where((usable & finite).view(-1, 1), z, torch.zeros_like(z))
    fz0 = f(z0)
    wide = torch.promote_types(fz0.dtype, torch.float32)
    res = torch.linalg.vector_norm((fz0 - z0).to(wide), dim=1)
    rel = res / (torch.linalg.vector_norm(fz0.to(wide), dim=1) + 1e-30)
    ok = usable & finite & torch.isfinite(rel) & (rel <= 1.0)
    rejected = given & ~ok
    start = torch.where(ok, torch.full_like(rejected, Start.WARM, dtype=torch.long),
                        torch.where(rejected, torch.full_like(rejected, Start.REJECTED, dtype=torch.long),
                                    torch.full_like(rejected, Start.COLD, dtype=torch.long)))
    redo = (~ok) & (usable & finite)          # evaluated at a state that is now dropped: f(0) for them
    if bool(redo.any()):
        idx = redo.nonzero().squeeze(1)
        z0 = z0.index_copy(0, idx, torch.zeros_like(z0.index_select(0, idx)))
        f_sub = restrict(idx) if restrict is not None else None
        fz_zero = f_sub(z0.index_select(0, idx)) if f_sub is not None else f(z0).index_select(0, idx)
        fz0 = fz0.index_copy(0, idx, fz_zero.to(fz0.dtype))
    return z0, fz0, start


def first_call_returns(f: Callable[[torch.Tensor], torch.Tensor], fz0: torch.Tensor):
    """f, except that its first call returns the precomputed f(z0) (every solver starts at f(z0))."""
    pending = [fz0]

    def g(z: torch.Tensor) -> torch.Tensor:
        if pending:
            first = pending.pop()
            if first.shape == z.shape:
                return first
        return f(z)

    return g
