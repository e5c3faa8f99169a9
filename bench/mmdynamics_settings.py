"""DEQ fusion settings on the main job: MM-Dynamics' own training loop on ROSMAP, against its baseline.

    python -m bench.mmdynamics_settings --seeds 0 1 2 --protocol val --jobs 2 \
        --json docs/mmdynamics-settings.json --markdown docs/mmdynamics-settings.md

Each named setting is one DEQ configuration (Jacobian weight + DEQFusion options); every seed runs
the concatenation baseline too, so each DEQ run's cost is printed as a ratio to the baseline of the
same seed (CPU time of the training call, one torch thread: robust to a neighbour's load). Columns:
CPU time and its ratio, forward-solve and adjoint evaluations of f per training epoch (batch-wide),
the final training solve's worst relative residual, the trained map's residual at step 20 from
zeros (Table 9), and the metrics under the chosen protocol. Real data (MOGONET ROSMAP).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# name -> (jac_weight, DEQFusion options); "today" is the default before warm starts existed
SETTINGS: Dict[str, Tuple[float, Dict[str, Any]]] = {
    "cold+IFT (today)": (0.1, {"f_max_iter": 12, "b_max_iter": 12}),
    "warm+IFT": (0.1, {"f_max_iter": 12, "b_max_iter": 12, "warm_start": True}),
    "warm+phantom(1)": (0.1, {"f_max_iter": 12, "warm_start": True, "backward": "phantom", "phantom_steps": 1}),
    "warm+phantom(3)": (0.1, {"f_max_iter": 12, "warm_start": True, "backward": "phantom", "phantom_steps": 3,
                               "phantom_tau": 0.8}),
}


def parse_setting(text: str) -> Tuple[str, Tuple[float, Dict[str, Any]]]:
    """NAME=jac:W,key=value,... -> (NAME, (W, options))."""
    from deqfusion.adapters.common.settings import parse_options

    name, _, spec = text.partition("=")
    opts = parse_options(spec, f"--setting {name}")
    jac = float(opts.pop("jac", 0.1))
    return name, (jac, opts)


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.mmdynamics_settings", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="rosmap", choices=["rosmap", "brca"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--protocol", default="val", choices=["val", "upstream"])
    p.add_argument("--only", nargs="*", default=None, help="run only these named settings")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=jac:W,key=value,...",
                   help="an extra setting, e.g. 'strong-jac=jac:1.0,f_max_iter=12,warm_start=True'")
    p.add_argument("--epochs", type=int, default=None, help="stop each run after N epochs (default: the upstream's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each); 1 for the cleanest timing")
    p.add_argument("--trace", action="store_true", help="also trace the trained maps from zeros (Table 9, step 20)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--upstream", type=Path, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = args_parser().parse_args(argv)
    from tqdm import tqdm

    from deqfusion.adapters import mmdynamics as adapter
    from deqfusion.adapters.common import run_pool
    from deqfusion.adapters.mmdynamics import data as mogonet_data
    from deqfusion.adapters.mmdynamics import runner

    settings = dict(SETTINGS)
    settings.update(parse_setting(s) for s in args.setting)
    if args.only is not None:
        unknown = [n for n in args.only if n not in settings]
        if unknown:
            raise SystemExit(f"unknown setting(s) {unknown}; known: {list(settings)}")
        settings = {n: settings[n] for n in args.only}
    ds = mogonet_data.spec(args.dataset)
    data_dir = mogonet_data.locate(ds.name, args.data_dir, download=False)
    upstream = runner.check_upstream(args.upstream)
    rows = [("concat", adapter.Settings(fusion="concat"))]
    rows += [(name, adapter.Settings(fusion="deq", jac_weight=jac, options=opts)) for name, (jac, opts) in settings.items()]
    tasks, keys = [], []
    for seed in args.seeds:
        for name, s in rows:
            keep = args.trace and name != "concat"
            spec = runner.RunSpec(dataset=ds.name, data_dir=data_dir, seed=seed, settings=s, protocol=args.protocol,
                                  epochs=args.epochs, device="cpu", threads=1, keep_model=keep)
            tasks.append(runner.Task(spec, upstream=upstream, trace_steps=20 if keep else 0))
            keys.append((name, seed))
    epochs = (args.epochs or runner.UPSTREAM_HPARAMS[ds.name]["epochs"] + 1)
    bar = tqdm(total=len(tasks) * epochs, unit="epoch", disable=args.quiet, file=sys.stderr)
    results: Dict[Tuple[str, int], Any] = {}

    def done(i: int, r: Any) -> None:
        results[keys[i]] = r
        bar.set_postfix_str(f"done {keys[i][0]} seed {keys[i][1]}")

    try:
        run_pool.run_tasks(tasks, runner.execute, jobs=args.jobs, threads=1, on_epoch=lambda i: bar.update(1),
                           on_done=done)
    finally:
        bar.close()
    proto = "val" if args.protocol == "val" else "upstream"
    table: Dict[str, Dict[str, Any]] = {}
    for name, _ in rows:
        runs = [results[(name, s)] for s in args.seeds]
        base = [results[("concat", s)] for s in args.seeds]
        entry: Dict[str, Any] = {
            "cpu_s": [r.cpu_s for r in runs], "wall_s": [r.wall_s for r in runs],
            "ratio": [r.cpu_s / b.cpu_s for r, b in zip(runs, base)],
            "acc": [r.metrics[proto]["acc"] for r in runs], "f1_macro": [r.metrics[proto]["f1_macro"] for r in runs],
            "auc": [r.metrics[proto].get("auc", float("nan")) for r in runs],
        }
        if proto == "val":
            entry["val_acc"] = [r.metrics["val"]["val"]["acc"] for r in runs]
        if name != "concat":
            per = [r.fusion_stats.get("per_epoch", {}) for r in runs]
            entry["forward_f_evals"] = [p.get("forward_f_evals", float("nan")) for p in per]
            entry["adjoint_evals"] = [p.get("adjoint_evals", float("nan")) for p in per]
            entry["train_rel_residual_max"] = [r.fusion_stats["train"].get("rel_residual_max", float("nan")) for r in runs]
            entry["eval_rel_residual_max"] = [r.fusion_stats["eval"].get("rel_residual_max", float("nan")) for r in runs]
            if args.trace:
                entry["step20_rel_residual"] = [float(next(iter(r.traces.values()))[:, 19].mean()) for r in runs]
        table[name] = entry
    report = {"command": "python -m bench.mmdynamics_settings " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dataset": ds.name, "protocol": proto, "seeds": args.seeds, "settings":
              {n: {"jac_weight": j, "options": o} for n, (j, o) in settings.items()}, "results": table,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    text = render(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(f"# DEQ settings on the main job ({ds.name}, real data)\n\n`{report['command']}`\n\n"
                                       + text + "\n")
    return report


def _m(values: List[float], fmt: str = "{:.2f}") -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return fmt.format(statistics.mean(vals)) + " ± " + fmt.format(statistics.stdev(vals))


def render(report: Dict[str, Any]) -> str:
    proto = report["protocol"]
    head = ["setting", "CPU s / run", "× baseline", "fwd f-evals / epoch", "adjoint evals / epoch",
            "train residual (max)", "step-20 residual", f"ACC ({proto})", "F1 macro", "AUC"]
    if proto == "val":
        head.insert(7, "val ACC")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report["results"].items():
        cells = [name, _m(e["cpu_s"], "{:.1f}"), _m(e["ratio"], "{:.1f}"), _m(e.get("forward_f_evals", []), "{:.1f}"),
                 _m(e.get("adjoint_evals", []), "{:.1f}"), _m(e.get("train_rel_residual_max", []), "{:.2g}"),
                 _m(e.get("step20_rel_residual", []), "{:.2g}")]
        if proto == "val":
            cells.append(_m(e["val_acc"]))
        cells += [_m(e["acc"]), _m(e["f1_macro"]), _m(e["auc"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Seeds {report['seeds']}; mean ± sample std where more than one; metrics in % on the test split "
                 f"({'checkpoint chosen on a validation split carved from training' if proto == 'val' else 'final model'}).")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
