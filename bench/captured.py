"""Eager vs captured: the sync-free solve (check_every=0) under torch.compile(mode="reduce-overhead").

With ``check_every=0`` a solve makes a fixed number of steps with no host synchronisation, so
``torch.compile`` traces the whole solver loop into one graph (Inductor fuses the per-step
normalisation, gating and mixing work; on CUDA, "reduce-overhead" also replays it as a CUDA graph).
Measured per shape, on the same weights and inputs:

- eager, default mode (early exit, converged samples dropped): what a user gets without compiling;
- eager and compiled with ``check_every=0`` and the same fixed number of steps: the capture's
  speed-up, the compile time, and the largest difference of the fused output (same arithmetic
  up to operation order);
- the same for a training step (forward + implicit backward; the adjoint solve and the Jacobian
  term run eagerly inside the autograd node, which Inductor cannot trace -- see core/layer.py).

The loop is unrolled when traced, so compile time grows with the step count: the comparison uses
``--captured-iters`` steps (default 12, the ROSMAP budget), not the forward comparison's cap.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

import torch

from .common import rel_err
from .measure import Setup, _loss, _target, build_fusion, make_inputs


def _timed(s: Setup, fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = s.clock.now()
        fn()
        times.append(s.clock.now() - t0)
    times.sort()
    return times[len(times) // 2]


def captured(s: Setup, iters: int = 12) -> List[Dict[str, Any]]:
    """Rows: eager default, eager sync-free, compiled sync-free; for the forward solve and a training step."""
    xs = make_inputs(s)
    target = _target(s)
    repeats = max(3, s.repeats)
    fixed = dict(f_max_iter=iters, b_max_iter=iters, f_tol=s.tol, b_tol=s.tol, jac_reg=False)
    default = build_fusion(s, **fixed)
    free = build_fusion(s, check_every=0, **fixed)
    compiled = torch.compile(free, mode="reduce-overhead")
    rows: List[Dict[str, Any]] = []

    # forward solve (inference)
    def infer(m):
        def run():
            with torch.no_grad():
                return m(xs).fused
        return run

    default.eval()
    free.eval()
    with torch.no_grad():
        ref = free(xs).fused
    t0 = time.perf_counter()
    out = infer(compiled)()
    infer(compiled)()                      # reduce-overhead records its graph on a later call
    compile_fwd = time.perf_counter() - t0
    diff_fwd = float((out.float() - ref.float()).abs().max())
    eager_default = _timed(s, infer(default), repeats)
    eager_free = _timed(s, infer(free), repeats)
    comp_free = _timed(s, infer(compiled), repeats)
    rows.append({"part": "forward solve", "iters": iters, "eager_default_s": eager_default, "eager_s": eager_free,
                 "captured_s": comp_free, "speedup": eager_free / comp_free, "compile_s": compile_fwd,
                 "max_abs_diff": diff_fwd})

    # training step: forward + implicit backward
    default.train()
    free.train()
    params = list(free.parameters())

    def train(m):
        def run():
            loss = _loss(m(xs).fused, target)
            return torch.autograd.grad(loss, params if m is not default else list(default.parameters()))
        return run

    g_ref = train(free)()
    t0 = time.perf_counter()
    g_comp = train(compiled)()
    train(compiled)()
    compile_train = time.perf_counter() - t0
    # norm-wise over all parameters, like the benchmark's gradient error (a tensor whose own gradient
    # is ~100x smaller than the rest shows float32 rounding as a large per-tensor relative error)
    diff_grad = rel_err(torch.cat([g.flatten() for g in g_comp]), torch.cat([g.flatten() for g in g_ref]))
    eager_default = _timed(s, train(default), repeats)
    eager_free = _timed(s, train(free), repeats)
    comp_free = _timed(s, train(compiled), repeats)
    rows.append({"part": "training step", "iters": iters, "eager_default_s": eager_default, "eager_s": eager_free,
                 "captured_s": comp_free, "speedup": eager_free / comp_free, "compile_s": compile_train,
                 "max_rel_grad_diff": diff_grad})
    return rows
