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


def _compare(s: Setup, part: str, iters: int, run, models, repeats: int, diff) -> Dict[str, Any]:
    """Time run(model)() for the eager default, eager sync-free and compiled models; diff(compiled, eager)."""
    default, free, compiled = models
    ref = run(free)()
    t0 = time.perf_counter()
    out = run(compiled)()
    run(compiled)()                        # reduce-overhead records its graph on a later call
    compile_s = time.perf_counter() - t0
    eager_default = _timed(s, run(default), repeats)
    eager_free = _timed(s, run(free), repeats)
    comp_free = _timed(s, run(compiled), repeats)
    return {"part": part, "iters": iters, "eager_default_s": eager_default, "eager_s": eager_free,
            "captured_s": comp_free, "speedup": eager_free / comp_free, "compile_s": compile_s, **diff(out, ref)}


def captured(s: Setup, iters: int = 12) -> List[Dict[str, Any]]:
    """Rows: eager default, eager sync-free, compiled sync-free; for the forward solve and a training step."""
    xs = make_inputs(s)
    target = _target(s)
    repeats = max(3, s.repeats)
    fixed = dict(f_max_iter=iters, b_max_iter=iters, f_tol=s.tol, b_tol=s.tol, jac_reg=False)
    default = build_fusion(s, **fixed)
    free = build_fusion(s, check_every=0, **fixed)
    models = (default, free, torch.compile(free, mode="reduce-overhead"))

    def infer(m):
        def run():
            with torch.no_grad():
                return m(xs).fused
        return run

    def train(m):
        params = list((default if m is default else free).parameters())   # the compiled module shares free's

        def run():
            return torch.autograd.grad(_loss(m(xs).fused, target), params)
        return run

    for m in (default, free):
        m.eval()
    rows = [_compare(s, "forward solve", iters, infer, models, repeats,
                     lambda out, ref: {"max_abs_diff": float((out.float() - ref.float()).abs().max())})]
    for m in (default, free):
        m.train()
    # norm-wise over all parameters, like the benchmark's gradient error (a tensor whose own gradient
    # is ~100x smaller than the rest shows float32 rounding as a large per-tensor relative error)
    rows.append(_compare(s, "training step", iters, train, models, repeats,
                         lambda out, ref: {"max_rel_grad_diff": rel_err(torch.cat([g.flatten() for g in out]),
                                                                         torch.cat([g.flatten() for g in ref]))}))
    return rows
