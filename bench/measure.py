"""What the benchmark measures, per shape and contender.

Every contender solves the same fixed point: the map of one `DEQFusion` (its weights copied
into the authors' release where that runs), on the same inputs, in the same process.

- forward: the fixed-point solve to a per-sample tolerance (eval mode, no grad);
- solver overhead: (solve time - time spent inside f) / time spent inside f;
- final per-sample residual of the estimate each returns, recomputed with the shared f;
- training step (IFT backward, no Jacobian term) at each contender's default tolerances:
  forward and backward time, and the gradient's error against a float64 reference;
- peak memory of a training step with 10 and 100 forced solver iterations.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from deqfusion import DEQFusion
from deqfusion.solvers import solve

from . import official as official_mod
from .common import Clock, TimedFn, peak_memory, per_sample_residual, rel_err
from .shapes import Shape


@dataclass
class Setup:
    shape: Shape
    device: torch.device
    clock: Clock
    tol: float                    # per-sample relative tolerance of the forward comparison
    max_iter: int
    repeats: int
    block_residual: bool
    seed: int = 0
    official: Any = None          # the release's DEQ_fusion module, when --official is given
    budget_s: float = 60.0        # CPU seconds a timing may take before repeats are cut short
    log: Callable[[str], None] = print
    grad_samples: int = 8
    mem_iters: Tuple[int, int] = (10, 100)
    mem_cap_bytes: float = 3e9    # unrolled-mode peaks projected above this are extrapolated
    cache: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ the shared problem
def build_fusion(s: Setup, dtype=torch.float32, **options) -> DEQFusion:
    sh = s.shape
    torch.manual_seed(s.seed)
    fusion = DEQFusion(sh.dim, sh.modalities, block_residual=s.block_residual, **options)
    base = s.cache.get("state")
    if base is None:
        s.cache["state"] = {k: v.clone() for k, v in fusion.state_dict().items()}
    else:
        fusion.load_state_dict(base)
    return fusion.to(s.device, dtype)


def make_inputs(s: Setup, batch: Optional[int] = None, dtype=torch.float32) -> List[torch.Tensor]:
    sh = s.shape
    g = torch.Generator().manual_seed(s.seed + 1)
    xs = [torch.randn(sh.batch, sh.dim, *sh.spatial, generator=g) for _ in range(sh.modalities)]
    if batch is not None:
        xs = [x[:batch] for x in xs]
    return [x.to(s.device, dtype) for x in xs]


def shared_map(fusion: DEQFusion, xs: List[torch.Tensor]):
    """(f, restrict, z0, unpack) of the fusion's fixed-point problem on the flat state."""
    masks = [None] * (fusion.config.num_modalities + 1)
    x_fuse = fusion._weighted_sum(xs)
    f, restrict = fusion._problem(xs, x_fuse, masks)
    _, unpack = fusion._packers(xs[0])
    z0 = torch.zeros(xs[0].shape[0], fusion._num_states() * xs[0][0].numel(), device=xs[0].device, dtype=xs[0].dtype)
    return f, restrict, z0, unpack


# ------------------------------------------------------------------ forward solve
def _record(name: str, timing: Dict[str, float], timed: TimedFn, f, z_est, batch: int, extra=None) -> Dict[str, Any]:
    rmax, rmed, res = per_sample_residual(f, z_est)
    in_f = timed.seconds
    row = {
        "contender": name,
        "forward_s": timing["median_s"], "forward_min_s": timing["min_s"], "runs": timing["runs"],
        "f_calls": timed.calls, "sample_evals": timed.samples, "f_seconds": in_f,
        "overhead": (timing["last_s"] - in_f) / in_f if in_f > 0 else float("nan"),
        "res_max": rmax, "res_median": rmed,
        "residuals": res.tolist(),
    }
    row.update(extra or {})
    return row


def _timed_runs(s: Setup, run: Callable[[], Any], timed: TimedFn, repeats: Optional[int] = None) -> Tuple[Dict[str, float], Any]:
    """Median time of run() over repeats; the f-time and call counts of the last run are kept."""
    times, out = [], None
    for _ in range(repeats or s.repeats):
        timed.reset()
        t = s.clock.now()
        out = run()
        times.append(s.clock.now() - t)
        if sum(times) > s.budget_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "last_s": times[-1], "runs": len(times)}, out


@dataclass
class Prepared:
    """A contender's forward solve, ready to be timed: run() -> output; finish(timing, output) -> row."""
    name: str
    run: Callable[[], Any]
    timed: TimedFn
    finish: Callable[[Dict[str, float], Any], Dict[str, Any]]
    context: Callable[[], Any]


def time_interleaved(s: Setup, contenders: List[Prepared], repeats: Optional[int] = None) -> List[Dict[str, Any]]:
    """Time the contenders round-robin (A B C A B C ...), so that a neighbour's load on a shared
    machine falls on all of them alike; median per contender."""
    times: Dict[str, List[float]] = {p.name: [] for p in contenders}
    last: Dict[str, Any] = {}
    for r in range(repeats or s.repeats):
        for p in contenders:
            if r and sum(times[p.name]) > s.budget_s:
                continue
            with p.context(), torch.no_grad():
                p.timed.reset()
                t = s.clock.now()
                last[p.name] = p.run()
                times[p.name].append(s.clock.now() - t)
    rows = []
    for p in contenders:
        ts = times[p.name]
        timing = {"median_s": statistics.median(ts), "min_s": min(ts), "last_s": ts[-1], "runs": len(ts)}
        with p.context(), torch.no_grad():
            rows.append(p.finish(timing, last[p.name]))
    return rows


def prepare_ours(s: Setup, solver: str) -> Prepared:
    fusion = build_fusion(s, f_solver=solver, f_max_iter=s.max_iter, f_tol=s.tol, f_stop_mode="rel", jac_reg=False).eval()
    xs = make_inputs(s)
    with torch.no_grad():
        f, restrict, z0, _ = shared_map(fusion, xs)
    timed = TimedFn(f, s.clock)
    kw = fusion.config.solver_kwargs("f")

    def timed_restrict(idx):
        return TimedFn(restrict(idx), s.clock, parent=timed)

    def run():
        return solve(solver, timed, z0, restrict=timed_restrict, **kw)

    def finish(timing, out):
        # the estimate handed on is f(z*), the image of the best iterate (DEQFusion's output;
        # torchdeq also returns the image), which is one application of f closer to the point
        _z, fz, stats = out
        return _record(f"deqfusion {solver}", timing, timed, f, fz, z0.shape[0],
                       {"converged": int(stats.converged.sum()), "batch": z0.shape[0],
                        "nstep_max": int(stats.nstep.max()), "nstep_median": float(stats.nstep.float().median())})

    return Prepared(f"deqfusion {solver}", run, timed, finish, _null)


def prepare_torchdeq(s: Setup) -> Optional[Prepared]:
    try:
        from torchdeq.solver import anderson_solver
    except ImportError:
        s.log("  torchdeq not installed (pip install -e .[bench]); skipped")
        return None
    fusion = build_fusion(s, jac_reg=False).eval()
    xs = make_inputs(s)
    with torch.no_grad():
        f, _, z0, _ = shared_map(fusion, xs)
    timed = TimedFn(f, s.clock)

    def run():
        return anderson_solver(timed, z0, max_iter=s.max_iter, tol=s.tol, stop_mode="rel", m=6, lam=1e-4)

    def finish(timing, out):
        z, _, info = out
        conv = int((info["rel_lowest"] <= s.tol).sum()) if "rel_lowest" in info else -1
        return _record("torchdeq anderson", timing, timed, f, z, z0.shape[0],
                       {"converged": conv, "batch": z0.shape[0], "nstep_max": timed.calls})

    return Prepared("torchdeq anderson", run, timed, finish, _null)


def _official_unavailable(s: Setup) -> Optional[str]:
    if s.official is None:
        return "not run (pass --official PATH to a checkout of github.com/jinhong-ni/DEQFusion)"
    if s.shape.spatial:
        return "n/a: the release's module takes (B, D) features only"
    if not s.block_residual:
        return "n/a: the release computes the +z_i form (run without --eq8)"
    return None


def prepare_official(s: Setup, target_res: float) -> Prepared:
    """The release's DEQFusion forward (eval). Its Anderson stops on one residual for the whole
    batch, so its eps is lowered first (halved, from the per-sample tolerance down) until the
    worst per-sample residual of its answer is no larger than `target_res` (ours), or it runs out
    of iterations; that eps is then timed."""
    mod = s.official
    ours = build_fusion(s, jac_reg=False)
    with torch.no_grad():
        fshared, _, _, _ = shared_map(ours, make_inputs(s))
    xs = make_inputs(s)
    with official_mod.shims(s.device):
        off = official_mod.build(mod, ours, f_thres=s.max_iter, b_thres=s.max_iter + 1).eval()
    timed = TimedFn(off.func_.forward, s.clock)
    off.func_.forward = timed

    def run():
        return official_mod.fused_and_state(mod, off, xs)

    eps, tried = s.tol, []
    with official_mod.shims(s.device), torch.no_grad():
        for _ in range(12):
            official_mod.set_solver(mod, off, eps=eps, stop_mode="rel")
            timed.reset()
            _, result = run()
            rmax = per_sample_residual(fshared, result["result"])[0]
            tried.append({"eps": eps, "res_max": rmax, "f_calls": timed.calls})
            if rmax <= target_res or timed.calls >= s.max_iter:
                break
            eps /= 2

    def finish(timing, out):
        _, result = out
        rmax = per_sample_residual(fshared, result["result"])[0]
        return _record("official release", timing, timed, fshared, result["result"], xs[0].shape[0],
                       {"eps": eps, "stop_mode": "rel (whole batch)", "eps_search": tried,
                        "reached_target": rmax <= target_res, "nstep_max": timed.calls})

    return Prepared("official release", run, timed, finish, lambda: official_mod.shims(s.device))


def forward(s: Setup) -> List[Dict[str, Any]]:
    """deqfusion's Anderson, torchdeq's and the release's, timed round-robin."""
    ours = prepare_ours(s, "anderson")
    with torch.no_grad():
        first = ours.finish({"median_s": 0.0, "min_s": 0.0, "last_s": 0.0, "runs": 0}, ours.run())
    contenders = [ours]
    td = prepare_torchdeq(s)
    if td is not None:
        contenders.append(td)
    why = _official_unavailable(s)
    if why is None:
        contenders.append(prepare_official(s, target_res=max(first["res_max"], s.tol)))
    rows = time_interleaved(s, contenders)
    if why is not None:
        rows.append({"contender": "official release", "skipped": why})
    return rows


def forward_ours(s: Setup, solver: str, repeats: Optional[int] = None) -> Dict[str, Any]:
    return time_interleaved(s, [prepare_ours(s, solver)], repeats=repeats)[0]


# ------------------------------------------------------------------ training step: time and gradient
def _loss(fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (fused * target).mean()


def _target(s: Setup, dtype=torch.float32, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed + 2)
    sh = s.shape
    t = torch.randn(sh.batch, sh.dim, *sh.spatial, generator=g)
    return (t if rows is None else t[rows.cpu()]).to(s.device, dtype)


@dataclass
class Step:
    """One contender's training step: forward() -> fused; gradients w.r.t. params; flat(grads)
    lays them out in the order of DEQFusion.parameters(); context() wraps forward and backward."""
    forward: Callable[[], torch.Tensor]
    params: List[torch.Tensor]
    flat: Callable[[Tuple[Optional[torch.Tensor], ...]], torch.Tensor]
    context: Callable[[], Any]


def _cat(params):
    def flat(grads):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return flat


def training_contenders(s: Setup, iters: Optional[int] = None, unrolled: bool = False,
                        common: bool = False) -> List[Tuple[str, Callable]]:
    """(name, make(xs) -> Step) per contender, for an IFT training step without Jacobian term.

    Default: each contender's own default tolerances. common=True: the comparison's per-sample
    relative tolerance and iteration cap (s.tol, s.max_iter) in the forward and the backward
    solve of every contender. An int `iters` forces that many iterations in both solves
    (tolerance 0; unroll_steps for the unrolled mode).
    """
    out: List[Tuple[str, Callable]] = []
    forced = iters is not None

    def ours(xs):
        opts: Dict[str, Any] = dict(jac_reg=False)
        if forced:
            opts.update(f_max_iter=iters, f_tol=0.0, b_max_iter=iters, b_tol=0.0)
        elif common:
            opts.update(f_max_iter=s.max_iter, f_tol=s.tol, f_stop_mode="rel",
                        b_max_iter=s.max_iter, b_tol=s.tol, b_stop_mode="rel")
        fusion = build_fusion(s, dtype=xs[0].dtype, **opts).train()
        params = list(fusion.parameters())
        return Step(lambda: fusion(xs).fused, params, _cat(params), _null)

    out.append(("deqfusion anderson", ours))
    if unrolled and forced:
        def ours_unrolled(xs):
            fusion = build_fusion(s, dtype=xs[0].dtype, jac_reg=False, mode="unrolled", unroll_steps=iters).train()
            params = list(fusion.parameters())
            return Step(lambda: fusion(xs).fused, params, _cat(params), _null)

        out.append(("deqfusion unrolled", ours_unrolled))
    try:
        from torchdeq import get_deq
    except ImportError:
        get_deq = None
    if get_deq is not None:
        def tdeq(xs):
            fusion = build_fusion(s, dtype=xs[0].dtype, jac_reg=False).train()
            kw: Dict[str, Any] = dict(f_solver="anderson", b_solver="anderson", ift=True)
            if forced:
                kw.update(f_max_iter=iters, f_tol=0.0, b_max_iter=iters, b_tol=0.0)
            elif common:
                kw.update(f_max_iter=s.max_iter, f_tol=s.tol, f_stop_mode="rel",
                          b_max_iter=s.max_iter, b_tol=s.tol, b_stop_mode="rel")
            deq = get_deq(**kw)

            def forward():
                f, _, z0, unpack = shared_map(fusion, xs)
                z_out, _info = deq(f, z0)
                return unpack(z_out[-1])[-1]

            params = list(fusion.parameters())
            return Step(forward, params, _cat(params), _null)

        out.append(("torchdeq anderson", tdeq))
    if _official_unavailable(s) is None:
        def off(xs):
            ours_f = build_fusion(s, dtype=xs[0].dtype, jac_reg=False)
            with official_mod.shims(s.device):
                if forced:
                    o = official_mod.build(s.official, ours_f, f_thres=iters, b_thres=iters).train()
                    official_mod.set_solver(s.official, o, eps=0.0, b_eps=0.0)
                elif common:
                    # its stopping test is one residual for the whole batch: the per-sample
                    # tolerance is the closest setting it has
                    o = official_mod.build(s.official, ours_f, f_thres=s.max_iter, b_thres=s.max_iter).train()
                    official_mod.set_solver(s.official, o, eps=s.tol, stop_mode="rel", b_eps=s.tol)
                else:
                    o = official_mod.build(s.official, ours_f).train()
            params = list(o.parameters())

            def forward():
                return official_mod.fused_and_state(s.official, o, xs)[0]

            def flat(grads):
                return official_mod.grads_in_our_order(o, ours_f, dict(zip(params, grads)))

            return Step(forward, params, flat, lambda: official_mod.shims(s.device))

        out.append(("official release", off))
    return out


def reference_gradient(s: Setup) -> Dict[str, Any]:
    """float64, tight solves, on a sub-batch of samples whose float64 fixed point is found."""
    if "ref" in s.cache:
        return s.cache["ref"]
    tight = dict(f_max_iter=400, f_tol=1e-12, f_stop_mode="abs", b_max_iter=400, b_tol=1e-12, b_stop_mode="abs")
    ref = build_fusion(s, dtype=torch.float64, jac_reg=False, **tight).eval()
    cand = min(s.shape.batch, 4 * s.grad_samples)
    xs = make_inputs(s, batch=cand, dtype=torch.float64)
    with torch.no_grad():
        stats = ref(xs).stats
    ok = stats.converged.nonzero().flatten()[: s.grad_samples]
    info: Dict[str, Any] = {"candidates": cand, "converged": int(stats.converged.sum())}
    if ok.numel() == 0:
        info["error"] = (f"no float64 fixed point: the reference solve (400 Anderson steps) converged for none of "
                         f"{cand} samples (best abs residual {float(stats.abs_lowest.min()):.1e})")
        s.cache["ref"] = info
        return info
    xs = [x[ok] for x in xs]
    out = ref(xs)
    grads = torch.autograd.grad(_loss(out.fused, _target(s, torch.float64, ok)), list(ref.parameters()))
    info.update(rows=ok, samples=ok.tolist(), grad=torch.cat([g.flatten() for g in grads]),
                backward_converged=bool(out.stats.backward.converged.all()) if out.stats.backward is not None else None)
    s.cache["ref"] = info
    return info


def _grad_error(s: Setup, make: Callable, ref: Dict[str, Any]) -> float:
    rows = ref["rows"]
    step = make([x[rows] for x in make_inputs(s)])
    with step.context():
        loss = _loss(step.forward(), _target(s, torch.float32, rows))
        grads = torch.autograd.grad(loss, step.params, allow_unused=True)
    return rel_err(step.flat(grads).to(ref["grad"]), ref["grad"])


def training(s: Setup) -> List[Dict[str, Any]]:
    """Per contender: forward and backward time of a training step on the full batch, with the
    comparison's per-sample tolerance in both solves (timed round-robin across contenders); the
    gradient's error against the float64 reference (on its sub-batch) at the contender's default
    tolerances."""
    ref = reference_gradient(s)
    defaults = training_contenders(s)
    common = dict(training_contenders(s, common=True))
    target = _target(s)
    steps = {name: common[name](make_inputs(s)) for name, _ in defaults}
    fw: Dict[str, List[float]] = {name: [] for name in steps}
    bw: Dict[str, List[float]] = {name: [] for name in steps}
    for r in range(s.repeats):
        for name, step in steps.items():
            if r and sum(fw[name]) + sum(bw[name]) > s.budget_s:
                continue
            with step.context():
                t0 = s.clock.now()
                loss = _loss(step.forward(), target)
                t1 = s.clock.now()
                torch.autograd.grad(loss, step.params, allow_unused=True)
                t2 = s.clock.now()
            fw[name].append(t1 - t0)
            bw[name].append(t2 - t1)
    rows = []
    for name, make_default in defaults:
        row: Dict[str, Any] = {"contender": name, "train_forward_s": statistics.median(fw[name]),
                               "backward_s": statistics.median(bw[name]), "train_runs": len(fw[name])}
        if "grad" in ref:
            row["grad_err"] = _grad_error(s, make_default, ref)
            if name == "deqfusion anderson":
                # the same tolerance with room to reach it, and a tenfold tighter one
                for label, opts in (("grad_err_200_steps", dict(f_max_iter=200, b_max_iter=200)),
                                    ("grad_err_1e-6", dict(f_max_iter=200, b_max_iter=200, f_tol=1e-6, b_tol=1e-6))):
                    def make(xs, opts=opts):
                        fusion = build_fusion(s, dtype=xs[0].dtype, jac_reg=False, **opts).train()
                        params = list(fusion.parameters())
                        return Step(lambda: fusion(xs).fused, params, _cat(params), _null)
                    row[label] = _grad_error(s, make, ref)
        else:
            row["grad_err_note"] = ref.get("error")
        rows.append(row)
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------ memory
def _state_bytes(s: Setup) -> float:
    return 4.0 * s.shape.batch * s.shape.state_numel


def memory(s: Setup) -> List[Dict[str, Any]]:
    """Peak memory of one training step with 10 and 100 forced solver iterations (unrolled: steps)."""
    rows = []
    lo, hi = s.mem_iters
    for name, _ in training_contenders(s, iters=lo, unrolled=True):
        row: Dict[str, Any] = {"contender": name}
        points, extrapolate = [lo, hi], False
        if name == "deqfusion unrolled" and 8 * _state_bytes(s) * hi > s.mem_cap_bytes:
            # about 8 saved activations of the state's size per unrolled step: where the real
            # count would not fit comfortably, measure two small counts and extrapolate
            points, extrapolate = [lo, 2 * lo], True
        peaks: Dict[int, Optional[float]] = {}
        for n_it in points:
            make = dict(training_contenders(s, iters=n_it, unrolled=True))[name]
            xs = make_inputs(s)
            target = _target(s)
            step = make(xs)
            with step.context():
                def run(step=step, target=target):
                    torch.autograd.grad(_loss(step.forward(), target), step.params, allow_unused=True)
                if s.device.type == "cuda":
                    run()                   # warm-up: CUDA's one-time workspaces are not the step's
                peaks[n_it] = peak_memory(run, s.device)
        if any(v is None for v in peaks.values()):
            row["note"] = "peak memory not measurable on this platform"
        else:
            row[f"peak_{lo}"] = peaks[lo]
            if extrapolate:
                per = (peaks[2 * lo] - peaks[lo]) / lo
                row[f"peak_{hi}"] = peaks[lo] + per * (hi - lo)
                row["extrapolated_from"] = {str(k): v for k, v in peaks.items()}
            else:
                row[f"peak_{hi}"] = peaks[hi]
            row["ratio"] = row[f"peak_{hi}"] / row[f"peak_{lo}"] if row[f"peak_{lo}"] else math.nan
        rows.append(row)
    return rows
