"""Clocks, peak-memory probes and small helpers shared by the benchmarks.

CPU timings are process CPU time (`time.process_time`) with one intra-op thread: on a shared
machine other processes stretch wall-clock time by large and varying factors, but not the CPU
time this process spends. CUDA timings are wall-clock time between `torch.cuda.synchronize()`
calls.
"""
from __future__ import annotations

import gc
import statistics
import time
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Clock:
    """now() on the benchmark's clock; synchronises CUDA first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.name = "wall-clock (CUDA synchronised)" if self.cuda else "process CPU time"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


class TimedFn:
    """Wraps f: counts calls, samples evaluated and the time spent inside f."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], clock: Clock, parent: Optional[TimedFn] = None):
        self.fn = fn
        self.clock = clock
        self.parent = parent
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.samples = 0
        self.seconds = 0.0

    def __call__(self, z, *args, **kwargs):
        t = self.clock.now()
        out = self.fn(z, *args, **kwargs)
        dt = self.clock.now() - t
        sink = self.parent or self
        sink.calls += 1
        first = z[0] if isinstance(z, (list, tuple)) else z
        sink.samples += first.shape[0]
        sink.seconds += dt
        return out


def median_time(fn: Callable[[], object], clock: Clock, repeats: int, budget_s: float = float("inf")) -> Dict[str, float]:
    """Run fn `repeats` times (fewer if the budget is spent after the first); median and spread."""
    times: List[float] = []
    for i in range(repeats):
        gc.collect()
        t = clock.now()
        fn()
        times.append(clock.now() - t)
        if sum(times) > budget_s and i >= 0:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


# ------------------------------------------------------------------ peak memory
class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, counted op by op (a CPU stand-in for CUDA's
    max_memory_allocated): every storage an op returns is counted once, until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
            return
        key = st.data_ptr()
        if key == 0 or key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak bytes of tensor memory fn() allocates on top of what exists when it starts.

    CUDA: torch.cuda.max_memory_allocated. CPU: the same quantity counted by a dispatch mode
    that follows every storage an op creates until it is freed (allocator-independent, unlike
    the process's resident set).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    counter = _LiveTensorBytes()
    with counter:
        fn()
    return float(counter.peak)


def per_sample_residual(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor):
    """(max, median, all) of ||f(z) - z|| / (||f(z)|| + 1e-8) per sample, in float64."""
    with torch.no_grad():
        fz = f(z)
        diff = (fz - z).flatten(1).double()
        res = diff.norm(dim=1) / (fz.flatten(1).double().norm(dim=1) + 1e-8)
    return float(res.max()), float(res.median()), res


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
