"""Benchmark deqfusion's DEQ fusion against torchdeq and the authors' release, in one process.

    python -m bench.run --quick                       # seconds: small stand-in shapes
    python -m bench.run --official ~/src/DEQFusion    # full CPU run (about 15 min on 2 cores)
    python -m bench.run --device cuda --official ...  # on a GPU

Prints one table per shape and a summary of the targets, and writes the numbers as JSON
(--json) and, if asked, as a Markdown report (--markdown docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from . import measure
from . import official as official_mod
from .captured import captured
from .common import Clock
from .shapes import QUICK, SHAPES


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small stand-in shapes, 1 repeat (a smoke test: ~20 s)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--official", metavar="PATH", help="checkout of github.com/jinhong-ni/DEQFusion to compare with")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU (default 1; timings are CPU time)")
    p.add_argument("--tol", type=float, default=1e-3, help="per-sample relative tolerance of the forward comparison")
    p.add_argument("--max-iter", type=int, default=55, help="solver iteration cap of the forward comparison (release default)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (median); default 3, 1 with --quick")
    p.add_argument("--budget", type=float, default=None, help="seconds one timing may take before repeats stop")
    p.add_argument("--eq8", action="store_true", help="use the paper's Eq. 8 blocks (no +z_i); the release cannot run then")
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "training", "memory", "solvers"],
                   help="parts to leave out ('solvers': Broyden and fixed-point in the forward table)")
    p.add_argument("--captured", action="store_true",
                   help="also time eager vs torch.compile(mode='reduce-overhead') of the sync-free solve (compiles: minutes on CPU)")
    p.add_argument("--captured-iters", type=int, default=12, help="fixed solver steps of the captured comparison")
    p.add_argument("--all-solvers", action="store_true", help="Broyden and fixed-point rows for the largest state too")
    p.add_argument("--json", default="bench_results.json", help="where to write the numbers (default %(default)s)")
    p.add_argument("--markdown", default=None, help="also write a Markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", metavar="JSON", help="only re-render the tables of an earlier run's JSON (with --markdown)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ formatting
def _ms(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _e(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def shape_table(res: Dict[str, Any]) -> List[str]:
    """Markdown table rows for one shape."""
    lines = ["| contender | fwd ms | f calls | sample-evals | conv. | overhead | max res | median res "
             "| train fwd ms | bwd ms | bwd/fwd | grad err | peak MB @10 | @100 | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fwd = {r["contender"]: r for r in res.get("forward", [])}
    trn = {r["contender"]: r for r in res.get("training", [])}
    mem = {r["contender"]: r for r in res.get("memory", [])}
    names = list(dict.fromkeys(list(fwd) + list(trn) + list(mem)))
    lo, hi = res.get("mem_iters", (10, 100))
    for n in names:
        f, t, m = fwd.get(n, {}), trn.get(n, {}), mem.get(n, {})
        if "skipped" in f:
            lines.append(f"| {n} | {f['skipped']} |" + " |" * 14)
            continue
        conv = f"{f['converged']}/{f['batch']}" if f.get("converged", -1) >= 0 and "batch" in f else "-"
        ratio = (t["backward_s"] / t["train_forward_s"]) if t.get("train_forward_s") else None
        grad = _e(t.get("grad_err")) if "grad_err" in t else ("n/a" if t else "-")
        peak_hi = _mb(m.get(f"peak_{hi}")) + ("*" if "extrapolated_from" in m else "")
        lines.append(
            f"| {n} | {_ms(f.get('forward_s'))} | {f.get('f_calls', '-')} | {f.get('sample_evals', '-')} | {conv} "
            f"| {_pct(f.get('overhead'))} | {_e(f.get('res_max'))} | {_e(f.get('res_median'))} "
            f"| {_ms(t.get('train_forward_s'))} | {_ms(t.get('backward_s'))} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {grad} | {_mb(m.get(f'peak_{lo}'))} | {peak_hi} | {_ratio(m.get('ratio'))} |")
    return lines


def captured_table(results: Dict[str, Any]) -> List[str]:
    """Eager vs captured, per shape and part (forward solve, training step)."""
    lines = ["| shape | part | steps | eager, default mode ms | eager, check_every=0 ms | captured ms | captured speed-up "
             "| compile s | max difference |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results["shapes"].items():
        for r in res.get("captured", []):
            diff = (f"{r['max_abs_diff']:.1e} (abs, fused)" if "max_abs_diff" in r
                    else f"{r['max_rel_grad_diff']:.1e} (rel, grads)")
            lines.append(f"| {name} | {r['part']} | {r['iters']} | {_ms(r['eager_default_s'])} | {_ms(r['eager_s'])} "
                         f"| {_ms(r['captured_s'])} | {r['speedup']:.2f}× | {r['compile_s']:.0f} | {diff} |")
    return lines


def summary(results: Dict[str, Any]) -> List[str]:
    """The issue's targets, checked against this run's numbers."""
    out = ["| shape | Anderson overhead (≤10%) | vs release (≥3×) | vs torchdeq (≥1.5×) | max res ours / torchdeq / release "
           "| peak 100/10 ours (≤1.1) / unrolled | grad err at defaults (≤1e-4); 200 steps; tol 1e-6 | bwd/fwd (≤1) |",
           "|---|---:|---:|---:|---|---|---|---:|"]
    for name, res in results["shapes"].items():
        fwd = {r["contender"]: r for r in res.get("forward", []) if "skipped" not in r}
        trn = {r["contender"]: r for r in res.get("training", [])}
        mem = {r["contender"]: r for r in res.get("memory", [])}
        ours = fwd.get("deqfusion anderson", {})
        td = fwd.get("torchdeq anderson", {})
        off = fwd.get("official release", {})

        def speed(other, ours=ours):
            if not other or not ours:
                return "-"
            return f"{other['forward_s'] / ours['forward_s']:.2f}×"

        res_line = " / ".join(_e(r.get("res_max")) if r else "-" for r in (ours, td, off))
        mo, mu = mem.get("deqfusion anderson", {}), mem.get("deqfusion unrolled", {})
        mem_line = f"{mo.get('ratio', float('nan')):.2f} / {mu.get('ratio', float('nan')):.2f}" if mo else "-"
        t = trn.get("deqfusion anderson", {})
        bf = f"{t['backward_s'] / t['train_forward_s']:.2f}" if t.get("train_forward_s") else "-"
        grad = _e(t.get("grad_err")) if "grad_err" in t else ("n/a" if t else "-")
        if "grad_err_200_steps" in t:
            grad += f"; {_e(t['grad_err_200_steps'])}; {_e(t['grad_err_1e-6'])}"
        out.append(f"| {name} | {_pct(ours.get('overhead'))} | {speed(off)} | {speed(td)} | {res_line} | {mem_line} | {grad} | {bf} |")
    return out


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu, "cpus": os.cpu_count()}
    try:
        from importlib.metadata import version

        info["torchdeq"] = version("torchdeq")
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        info["torchdeq"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(results: Dict[str, Any]) -> str:
    a = results["args"]
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench.run` (see `bench/`); every number below comes from the one run "
             "described here. Re-run the same command to reproduce it.", "",
             f"- command: `{results['command']}`",
             f"- machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs, "
             f"{results['machine']['platform']}; Python {results['machine']['python']}, torch {results['machine']['torch']}, "
             f"torchdeq {results['machine']['torchdeq']}; device {a['device']}, {a['threads']} intra-op thread(s)",
             f"- clock: {results['clock']}; median of up to {results['repeats']} runs",
             f"- forward comparison: per-sample relative tolerance {a['tol']:g}, at most {a['max_iter']} iterations, "
             f"Anderson m=6, lam=1e-4 for every contender; fusion blocks: "
             f"{'paper Eq. 8' if a['eq8'] else 'the release form (+z_i before the last ReLU)'}; default PyTorch initialisation, "
             "inputs N(0, 1)",
             f"- total run time: {results['elapsed_s']:.0f} s wall-clock", ""]
    lines += ["Reproduce: `pip install -e .[bench]`, clone the authors' release "
              "(`git clone https://github.com/jinhong-ni/DEQFusion`), then run the command above with `--official` "
              "pointing at the clone (without it, the release's rows are left out). `python -m bench.run --quick` is "
              "the seconds-long smoke version (tests/test_bench_smoke.py); `--device cuda` runs on a GPU.", ""]
    parts = {k for res in results["shapes"].values() for k in ("forward", "training", "memory", "captured") if k in res}
    if parts - {"captured"}:
        lines += ["## Targets", ""] + summary(results) + [""] + verdicts(results) + [""]
    if "captured" in parts:
        lines += ["## Eager vs captured (check_every=0 under torch.compile(mode=\"reduce-overhead\"))", "",
                  "Forward solve (eval) and training step (forward + implicit backward, no Jacobian term) with a fixed "
                  "number of solver steps and no early exit; `bench/captured.py` says what is compiled and what runs "
                  "eagerly. 'eager, default mode' is the uncompiled layer with its default early exit "
                  "(check_every=1, converged samples dropped) at the same step cap. compile s: wall-clock of the first "
                  "two calls, compilation included (Inductor's on-disk cache shortens it on a re-run). max difference: "
                  "compiled vs eager; it stays at float32 rounding where the map contracts and grows where it does not "
                  "(ImVoteNet-like: no sample converges, so rounding differences are amplified step by step).", ""]
        if results.get("captured_command"):
            lines += [f"Measured by `{results['captured_command']}` and merged into this report.", ""]
        lines += captured_table(results) + [""]
    if not parts - {"captured"}:
        return "\n".join(lines)
    lines += ["## Per shape", ""]
    for name, res in results["shapes"].items():
        lines += [f"### {name}: {res['describe']}", ""] + shape_table(res) + [""]
        notes = list(res.get("notes", []))
        fwd = {r["contender"]: r for r in res.get("forward", []) if "skipped" not in r}
        if fwd and all(r.get("converged", 1) == 0 for r in fwd.values() if "converged" in r):
            notes.insert(0, f"no contender brings any sample to the tolerance within {a['max_iter']} steps here: at "
                            "default initialisation this map is not contracting (plain iteration stalls near a relative "
                            "residual of 0.5), so the forward times are for the step cap and the residuals compare "
                            "what each reaches")
        for note in notes:
            lines.append(f"- {note}")
        lines.append("")
    lines += ["## Columns", "",
              "- fwd ms: forward fixed-point solve to the tolerance (eval, no grad), median; f calls: evaluations "
              "of f for the batch; sample-evals: samples evaluated in total (deqfusion drops converged samples); "
              "conv.: samples at or below the tolerance;",
              "- overhead: (solve time - time inside f) / time inside f, from the same run;",
              "- max/median res: per-sample ||f(z) - z|| / ||f(z)|| of the estimate each contender returns, "
              "recomputed with the shared f;",
              "- train fwd / bwd ms: one training step (IFT backward, no Jacobian term), the forward and the "
              "backward solve both at the comparison's tolerance and iteration cap (the release: that tolerance on "
              "its whole-batch residual, the only stopping test it has);",
              "- grad err: relative error of the parameter gradient against a float64 solve to 1e-12 "
              "(on up to 8 samples whose float64 fixed point exists), at each contender's default tolerances "
              "(deqfusion: rel 1e-5 per sample, 55/56 steps; torchdeq get_deq(anderson, ift=True): abs 1e-3 / "
              "1e-6, 40/40 steps; release: abs 1e-3 for the whole batch / rel 1e-3, 55/56 steps); in the targets "
              "table also deqfusion with 200/200 steps at its default tolerance, and at 1e-6;",
              "- peak MB: peak memory of one training step above the memory held before it, with 10 and 100 forced "
              "solver iterations (tolerance 0) in the forward and the backward solve (unrolled: steps); on CPU the "
              "bytes of tensor storage alive, followed op by op (allocator-independent, like CUDA's "
              "max_memory_allocated); `*` = extrapolated linearly from 10 and 20 steps; ratio = @100 / @10.", ""]
    lines += NOTES
    return "\n".join(lines)


def verdicts(results: Dict[str, Any]) -> List[str]:
    """One line per target: on which shapes this run meets it."""
    met: Dict[str, List[str]] = {}
    missed: Dict[str, List[str]] = {}

    def judge(key: str, shape: str, value: Optional[float], ok: Optional[bool], fmt: str) -> None:
        if value is None or ok is None or (isinstance(value, float) and math.isnan(value)):
            return
        (met if ok else missed).setdefault(key, []).append(f"{shape} ({fmt.format(value)})")

    for name, res in results["shapes"].items():
        fwd = {r["contender"]: r for r in res.get("forward", []) if "skipped" not in r}
        trn = {r["contender"]: r for r in res.get("training", [])}
        mem = {r["contender"]: r for r in res.get("memory", [])}
        ours, td, off = fwd.get("deqfusion anderson"), fwd.get("torchdeq anderson"), fwd.get("official release")
        if ours:
            judge("Anderson overhead <= 10%", name, ours["overhead"], ours["overhead"] <= 0.10, "{:.0%}")
            for other, key, need in ((td, "forward >= 1.5x torchdeq", 1.5), (off, "forward >= 3x the release", 3.0)):
                if other:
                    speed = other["forward_s"] / ours["forward_s"]
                    # at the same per-sample tolerance: the worst sample no worse than the other's worst
                    # or than the tolerance (5% slack for rounding)
                    tol = results["args"]["tol"]
                    same = ours["res_max"] <= 1.05 * max(other["res_max"], tol)
                    fmt = "{:.2f}x" + (", no sample reached the tolerance: time for the step cap"
                                       if ours.get("converged") == 0 else "")
                    judge(key, name, speed, speed >= need and same, fmt)
        mo = mem.get("deqfusion anderson", {})
        if "ratio" in mo:
            judge("training memory @100 <= 1.1x @10", name, mo["ratio"], mo["ratio"] <= 1.1, "{:.2f}")
        t = trn.get("deqfusion anderson", {})
        if "grad_err" in t:
            judge("gradient error <= 1e-4 at default tolerances", name, t["grad_err"], t["grad_err"] <= 1e-4, "{:.1e}")
        if t.get("train_forward_s"):
            ratio = t["backward_s"] / t["train_forward_s"]
            judge("backward time <= forward time", name, ratio, ratio <= 1.0, "{:.2f}")
    order = ["Anderson overhead <= 10%", "forward >= 3x the release", "forward >= 1.5x torchdeq",
             "training memory @100 <= 1.1x @10", "gradient error <= 1e-4 at default tolerances",
             "backward time <= forward time"]
    keys = [k for k in order if k in met or k in missed]
    out = ["Verdicts of this run:", ""]
    for k in keys:
        parts = []
        if met.get(k):
            parts.append("met on " + ", ".join(met[k]))
        if missed.get(k):
            parts.append("not met on " + ", ".join(missed[k]))
        out.append(f"- {k}: " + "; ".join(parts))
    return out


NOTES = [
    "## What the numbers depend on", "",
    "- **Same f for everyone.** deqfusion and torchdeq iterate the very same Python function (the map of one "
    "`DEQFusion`); the release runs its own module with the same weights (a test checks that its map agrees with "
    "ours to 1e-5). Differences in time are therefore the solvers' own work and the number of samples they push "
    "through f.",
    "- **Dropping converged samples.** deqfusion stops evaluating f for a sample once it has converged (it "
    "compacts the batch at its check points); torchdeq and the release iterate the whole batch until the last "
    "sample converges. The `sample-evals` column shows the difference; it is large where samples converge at "
    "very different steps (BRCA-, MM-IMDB-like) and small where they converge together (VQA-like). On CPU, f for "
    "a few samples still reads every weight, so the time saved is less than the samples saved when the weights "
    "are large (VQA-like: 16 MB per linear map).",
    "- **Solver overhead.** An Anderson step of deqfusion costs O(mD) per sample: the newest Gram row and "
    "the mixing each read one window of m=6 past states (12 states' worth of memory traffic, from DRAM once "
    "f has evicted them), plus about 95 small tensor operations on per-sample vectors (residuals, the 6x6 "
    "systems, the per-sample bookkeeping), each costing a few microseconds of dispatch whatever its size. "
    "On the MM-IMDB-like shape that is about 1 ms a step against 5 ms for f: roughly half memory traffic, "
    "half dispatch. Where f is expensive per byte of state (VQA-like: 2048-wide matrices) it is 5%; no "
    "shape with a cheaper f got under 18% in pure PyTorch on this CPU. torchdeq recomputes the whole Gram "
    "matrix and rebuilds the window every step (O(m^2 D)).",
    "- **Memory.** The implicit backward keeps one graph of f; the solvers keep fixed-size windows; so the "
    "training step's peak does not grow with the iteration count (ratio ~1). The unrolled weight-tied mode keeps "
    "every step's activations and grows linearly.",
    "- **Gradient error.** With default PyTorch initialisation these maps are poorly contracting (Anderson needs "
    "50-100 steps for 1e-5), so the implicit gradient's error is the solve's residual times a large condition "
    "number: at the default tolerance and step caps many samples stop at the cap; with room to converge "
    "(200 steps) the error is bounded by the tolerance, and a tenfold tighter tolerance gives a tenfold smaller "
    "error. On contracting maps (tests/test_layer_gradients.py) the defaults give 2.6e-5.",
    "- **Backward vs forward.** The adjoint system has the same spectrum as the forward map, so it needs about "
    "as many steps; a vector-Jacobian product costs about one evaluation of f, and the final pass to the "
    "parameters about two. The backward therefore costs about as much as the forward, a little more here.",
    "- **CUDA.** Not measured in this run (no GPU). `--device cuda` times with `torch.cuda.synchronize()` around "
    "every measurement and reports `torch.cuda.max_memory_allocated`; `--captured` adds eager vs "
    "`torch.compile(mode=\"reduce-overhead\")` (CUDA graphs there). With `check_every=0` (or k) the solve "
    "makes no per-step host synchronisation: tests/test_bench_fastpath.py compiles each solver with "
    "`torch.compile(fullgraph=True)`, checks that the eval forward of a DEQFusion is one graph with no break, "
    "and counts zero `.item()`/`nonzero` calls in a whole training step.",
    "- **Captured on CPU.** Without CUDA graphs, compiling buys only Inductor's fusion of the elementwise work "
    "(GroupNorm, ReLU, gating, the solver's bookkeeping) between the matrix products: 1.3x on the forward "
    "solve of the BRCA- and MM-IMDB-like shapes, nothing where the matrix products dominate (VQA-, ImVoteNet-like). "
    "The training step gains less: its adjoint solve and the final vector-Jacobian products run eagerly inside "
    "the implicit-backward node (autograd.grad inside a backward cannot be traced), so only the forward solve "
    "is compiled.",
    "",
]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            results = json.load(fh)
        print("\n".join(summary(results)))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(markdown(results))
        return 0
    t_start = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock = Clock(device)
    off_module = None
    if args.official:
        try:
            off_module = official_mod.load(args.official)
        except official_mod.OfficialUnavailable as err:
            print(err, file=sys.stderr)
            return 2
    if args.eq8 and args.official:
        print("note: --eq8 changes the function; the release (which adds +z_i) is left out", file=sys.stderr)
    shapes = QUICK if args.quick else SHAPES
    repeats = args.repeats or (1 if args.quick else 3)
    budget = args.budget or (5.0 if args.quick else 15.0)
    mem_iters = (3, 12) if args.quick else (10, 100)
    results: Dict[str, Any] = {
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "machine": machine(), "clock": clock.name, "repeats": repeats, "shapes": {},
    }
    for name in args.shapes:
        shape = shapes[name]
        s = measure.Setup(shape=shape, device=device, clock=clock, tol=args.tol, max_iter=args.max_iter,
                          repeats=repeats, block_residual=not args.eq8, seed=args.seed, official=off_module,
                          budget_s=budget, mem_iters=mem_iters, grad_samples=4 if args.quick else 8)
        print(f"\n== {name}: {shape.describe()} ({shape.note})", flush=True)
        res: Dict[str, Any] = {"describe": shape.describe(), "mem_iters": mem_iters, "notes": []}
        if "forward" not in args.skip:
            rows = measure.forward(s)
            for row in rows:
                if "skipped" in row:
                    continue
                extra = f" (eps {row['eps']:.1e})" if "eps" in row else ""
                print(f"  forward {row['contender']}: {_ms(row['forward_s'])} ms{extra}", flush=True)
                if row.get("reached_target") is False:
                    res["notes"].append("the release did not reach deqfusion's worst per-sample residual within "
                                        f"{args.max_iter} iterations at any eps tried; its time is for the smallest eps tried")
            big = shape.batch * shape.state_numel > 4e6 and not args.all_solvers
            if "solvers" not in args.skip and big:
                res["notes"].append("Broyden and fixed-point rows left out for this state size (Broyden keeps "
                                    "30 rank-one terms of the whole state: ~1 CPU-minute here); --all-solvers adds them")
            elif "solvers" not in args.skip:
                for solver in ("broyden", "fixed_point_iter"):      # for reference: one timed run each
                    rows.append(measure.forward_ours(s, solver, repeats=1))
            res["forward"] = rows
        if "training" not in args.skip:
            res["training"] = measure.training(s)
            ref = s.cache.get("ref", {})
            if "error" in ref:
                res["notes"].append(f"gradient error: {ref['error']}")
            elif ref:
                res["notes"].append(f"gradient reference: float64 on samples {ref['samples']} "
                                    f"({ref['converged']} of the first {ref['candidates']} have a float64 fixed point)")
            print("  training: " + ", ".join(f"{r['contender']} fwd {_ms(r['train_forward_s'])} bwd {_ms(r['backward_s'])} ms"
                                             for r in res["training"]), flush=True)
        if "memory" not in args.skip:
            res["memory"] = measure.memory(s)
            print("  memory: " + ", ".join(f"{r['contender']} {r.get('ratio', float('nan')):.2f}x" for r in res["memory"]), flush=True)
        if args.captured:
            res["captured"] = captured(s, iters=args.captured_iters)
            print("  captured: " + ", ".join(f"{r['part']} {r['speedup']:.2f}x (compile {r['compile_s']:.0f} s)"
                                            for r in res["captured"]), flush=True)
        if set(res) & {"forward", "training", "memory"}:
            print("\n".join(shape_table(res)), flush=True)
        results["shapes"][name] = res
        for r in res.get("forward", []):
            r.pop("residuals", None) if len(r.get("residuals", [])) > 1024 else None
    results["elapsed_s"] = time.time() - t_start
    if any(set(r) & {"forward", "training", "memory"} for r in results["shapes"].values()):
        print("\nTargets:\n" + "\n".join(summary(results)))
    if args.captured:
        print("\nEager vs captured:\n" + "\n".join(captured_table(results)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(results))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
