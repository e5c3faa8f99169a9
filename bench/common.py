"""Clocks, peak-memory probes and small helpers shared by the benchmarks.

CPU timings are process CPU time (`time.process_time`) with one intra-op thread: on a shared
machine other processes stretch wall-clock time by large and varying factors, but not the CPU
time this process spends. CUDA timings are wall-clock time between `torch.cuda.synchronize()`
calls.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


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
_libc = None


def _trim() -> None:
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _proc_status(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024.0
    except OSError:  # pragma: no cover - no procfs
        return None
    return None


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak bytes above the starting point while fn() runs, or None if it cannot be measured.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the process's resident-set high-water
    mark (VmHWM) after returning freed heap to the OS (malloc_trim) and resetting the mark
    (/proc/self/clear_refs), so that every byte fn allocates is a fresh page.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    _trim()
    if not cpu_peak_supported():
        return None
    base = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0.0)


def per_sample_residual(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor):
    """(max, median, all) of ||f(z) - z|| / (||f(z)|| + 1e-8) per sample, in float64."""
    with torch.no_grad():
        fz = f(z)
        diff = (fz - z).flatten(1).double()
        res = diff.norm(dim=1) / (fz.flatten(1).double().norm(dim=1) + 1e-8)
    return float(res.max()), float(res.median()), res


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
