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
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (median); default 5, 1 with --quick")
    p.add_argument("--budget", type=float, default=None, help="seconds one timing may take before repeats stop")
    p.add_argument("--eq8", action="store_true", help="use the paper's Eq. 8 blocks (no +z_i); the release cannot run then")
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "training", "memory", "solvers"],
                   help="parts to leave out ('solvers': Broyden and fixed-point in the forward table)")
    p.add_argument("--json", default="bench_results.json", help="where to write the numbers (default %(default)s)")
    p.add_argument("--markdown", default=None, help="also write a Markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
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
        import torchdeq
        info["torchdeq"] = getattr(torchdeq, "__version__", "installed")
    except ImportError:
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
    lines += ["## Targets", ""] + summary(results) + [""]
    lines += ["## Per shape", ""]
    for name, res in results["shapes"].items():
        lines += [f"### {name}: {res['describe']}", ""] + shape_table(res) + [""]
        for note in res.get("notes", []):
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
              "solver iterations (tolerance 0) in the forward and the backward solve (unrolled: steps); "
              "`*` = extrapolated linearly from 10 and 20 steps; ratio = @100 / @10.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
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
    repeats = args.repeats or (1 if args.quick else 5)
    budget = args.budget or (5.0 if args.quick else 20.0)
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
            rows = [measure.forward_ours(s, "anderson")]
            print(f"  forward deqfusion anderson: {_ms(rows[0]['forward_s'])} ms", flush=True)
            td = measure.forward_torchdeq(s)
            if td:
                rows.append(td)
                print(f"  forward torchdeq: {_ms(td['forward_s'])} ms", flush=True)
            off = measure.forward_official(s, target_res=max(rows[0]["res_max"], args.tol))
            rows.append(off)
            if "skipped" not in off:
                print(f"  forward official: {_ms(off['forward_s'])} ms (eps {off['eps']:.1e})", flush=True)
                if not off["reached_target"]:
                    res["notes"].append("the release did not reach deqfusion's worst per-sample residual within "
                                        f"{args.max_iter} iterations at any eps tried; its time is for the smallest eps tried")
            if "solvers" not in args.skip:
                for solver in ("broyden", "fixed_point_iter"):
                    rows.append(measure.forward_ours(s, solver))
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
        print("\n".join(shape_table(res)), flush=True)
        results["shapes"][name] = res
        for r in res.get("forward", []):
            r.pop("residuals", None) if len(r.get("residuals", [])) > 1024 else None
    results["elapsed_s"] = time.time() - t_start
    print("\nTargets:\n" + "\n".join(summary(results)))
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
