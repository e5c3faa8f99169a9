"""Where one DEQ-fusion training step spends its time, by kind of operation (CPU, one thread).

    python -m bench.fusion_profile                       # ROSMAP's shapes, today's ROSMAP default
    python -m bench.fusion_profile --option f_max_iter=4 --option warm_start=True --option backward=phantom

Random inputs at the main job's shapes (MM-Dynamics on ROSMAP: 245 samples, 3 views, 300
features). Profiles a no-grad solve (what the forward pays per step) and full training steps
(solve, backward, Jacobian term), and groups torch's operator self-times into matrix products,
normalisation, copies and the elementwise rest. A cheaper map kernel can only win the share that
is not matrix products; this prints that share. `--compile` also times one evaluation of the map
compiled by torch.compile against the eager one, with the compile time. Times are process CPU time.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch

# operator-name prefixes of each group; anything else is "elementwise and other"
GROUPS = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "normalisation": ("aten::native_layer_norm", "aten::native_group_norm"),
    "copies and indexing": ("aten::cat", "aten::copy_", "aten::index", "aten::clone"),
    "small linear algebra": ("aten::linalg_",),
}
OTHER = "elementwise and other"


def group_of(name: str) -> str:
    """The group an aten operator belongs to (its backward kernels count with it)."""
    for group, prefixes in GROUPS.items():
        if any(name.startswith(p) for p in prefixes):
            return group
    return OTHER


def grouped_self_times(events) -> Dict[str, float]:
    """Sum of self CPU time (s) per group over aten operators (autograd nodes' own time goes to "other")."""
    out: Dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.key.startswith("aten::") or "Backward" in ev.key:
            out[group_of(ev.key)] += ev.self_cpu_time_total / 1e6
    return dict(out)


def build(batch: int, dim: int, modalities: int, options: Dict[str, Any], seed: int):
    from deqfusion import DEQFusion

    torch.manual_seed(seed)
    fusion = DEQFusion(dim=dim, num_modalities=modalities, **options)
    xs = [torch.randn(batch, dim, requires_grad=True) for _ in range(modalities)]
    return fusion, xs


def profile(fusion, xs, *, steps: int, jac_weight: float) -> Dict[str, Any]:
    """CPU ms per call, solver steps and grouped operator shares of a no-grad solve and of a training step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.arange(xs[0].shape[0]) if fusion.warm_store is not None else None

    def train_step():
        out = fusion(xs, sample_ids=ids)
        (out.fused.square().mean() + jac_weight * out.jac_loss).backward()
        return out

    def solve():
        with torch.no_grad():
            return fusion(xs, sample_ids=ids)

    result: Dict[str, Any] = {}
    for name, fn, training in (("no-grad solve", solve, False), ("training step", train_step, True)):
        fusion.train(training)
        for _ in range(2):                       # warm-up: allocator, the warm store
            out = fn()
        t = time.process_time()
        for _ in range(steps):
            out = fn()
        per_call = (time.process_time() - t) / steps
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        groups = grouped_self_times(prof.key_averages())
        total = sum(groups.values()) or 1.0
        result[name] = {
            "ms_per_call": per_call * 1e3,
            "solver_steps": float(out.stats.nstep.float().max()),
            "share": {g: groups.get(g, 0.0) / total for g in [*GROUPS, OTHER]},
        }
    return result


def compare_compiled(fusion, xs, *, calls: int = 50) -> Dict[str, float]:
    """ms per no-grad evaluation of the map, eager and torch.compile'd (static shapes), and the compile s."""
    fusion.eval()
    with torch.no_grad():
        inputs = [x.detach() for x in xs]
        f, _ = fusion.fixed_point_map(inputs)
        z = fusion(inputs).stats.state                  # a solved state: the flat (B, D) input of f

        def per_call(fn) -> float:
            for _ in range(3):
                fn(z)
            t = time.process_time()
            for _ in range(calls):
                fn(z)
            return (time.process_time() - t) / calls * 1e3

        eager = per_call(f)
        t = time.perf_counter()
        compiled = torch.compile(f, dynamic=False)
        compiled(z)
        compile_s = time.perf_counter() - t
        return {"eager_ms": eager, "compiled_ms": per_call(compiled), "compile_s": compile_s,
                "max_abs_diff": float((compiled(z) - f(z)).abs().max())}


def render(result: Dict[str, Any], header: str) -> str:
    names = [*GROUPS, OTHER]
    lines = [header, "", "| call | ms / call | solver steps | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for call, r in result.items():
        shares = " | ".join(f"{100 * r['share'][g]:.0f} %" for g in names)
        lines.append(f"| {call} | {r['ms_per_call']:.1f} | {r['solver_steps']:.0f} | {shares} |")
    solve = result["no-grad solve"]
    lines += ["", f"One no-grad solver step: {solve['ms_per_call'] / max(solve['solver_steps'], 1):.1f} ms; "
                  f"matrix products are {100 * solve['share']['matrix products']:.0f} % of the solve "
                  "(the part a fused elementwise kernel cannot shorten)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from deqfusion.adapters.common.settings import parse_options

    p = argparse.ArgumentParser(prog="python -m bench.fusion_profile", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=245)
    p.add_argument("--dim", type=int, default=300)
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="calls timed and profiled per kind")
    p.add_argument("--jac-weight", type=float, default=0.1)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a DEQFusion option (default: ROSMAP's f_max_iter=12 b_max_iter=12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also time the map under torch.compile (needs a C++ compiler)")
    args = p.parse_args(argv)
    options = {"f_max_iter": 12, "b_max_iter": 12}
    options.update(parse_options(",".join(args.option), "--option") if args.option else {})
    torch.set_num_threads(1)
    fusion, xs = build(args.batch, args.dim, args.modalities, options, args.seed)
    result = profile(fusion, xs, steps=args.steps, jac_weight=args.jac_weight)
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    print(render(result, f"DEQ fusion, B={args.batch}, C={args.dim}, {args.modalities} modalities, one thread; "
                         f"{opts}; random inputs (a cost profile, not a result)"))
    if args.compile:
        c = compare_compiled(fusion, xs)
        print(f"\nOne map evaluation, no grad: eager {c['eager_ms']:.1f} ms, torch.compile {c['compiled_ms']:.1f} ms "
              f"({c['eager_ms'] / c['compiled_ms']:.2f}x), after {c['compile_s']:.0f} s of compiling per input shape; "
              f"largest difference {c['max_abs_diff']:.1e}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
