"""``deqfusion reproduce <upstream>``: the paper's tables on real data, through the upstream's own loop.

    deqfusion reproduce mmdynamics --dataset rosmap --seeds 10
    deqfusion reproduce mmdynamics --dataset brca --seeds 10 --ablation      # Tables 6/7 rows
    deqfusion reproduce mmdynamics --dataset brca --seeds 10 --modalities    # Table 1, two-modality rows

Each row of a table is trained on the same data split(s) and the same seeds as the MM-Dynamics
baseline (concatenation).  The command prints mean ± std (sample std over seeds, ddof=1) per row and
protocol, and writes ``results.json``, ``table.md``, ``table.csv``, the per-run upstream logs and,
when the DEQ row runs, the paper's Fig. 3 (``convergence.png``) and Table 9 (residuals at steps
1/10/20/40/100) for seed ``seeds[0]``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import mmdynamics as adapter
from ..common import report
from ..common.reproduce import HelpFormatter
from . import data as mogonet_data

# The paper's Table 1 (BRCA, mean over 10 runs; Acc / weighted F1 / macro F1, in %).
PAPER_BRCA = {
    "concat": {"acc": 87.7, "f1_weighted": 88.0, "f1_macro": 84.5},
    "deq:full": {"acc": 89.1, "f1_weighted": 89.7, "f1_macro": 87.6},
}
ABLATION_ROWS = ("weighted_sum", "no_deq", "modality_deq", "fusion_deq", "full", "no_gate")
ABLATION_TITLES = {
    "weighted_sum": "weighted sum (no f_θ, no f_fuse, no DEQ)",
    "no_deq": "f_θ + f_fuse, one pass (no DEQ)",
    "modality_deq": "f_θ + DEQ (fused = Σ z_i)",
    "fusion_deq": "f_fuse + DEQ (f_θ = identity)",
    "full": "DEQ fusion (full)",
    "no_gate": "DEQ fusion without gate (purify removed)",
}
TABLE9_STEPS = (1, 10, 20, 40, 100)
# DEQ settings per dataset when the command line does not set them (see docs/mmdynamics.md):
# BRCA: the paper's (Jacobian weight 20, at most 105 forward / 106 adjoint steps).
# ROSMAP (not in the paper): weight 20 collapses the fusion to a constant there, so 0.1 (chosen on a
# validation split, seed 0; the paper's MM-IMDB value), and 12/12 solver steps to fit the time budget.
# Kept after measuring the cheap settings (warm starts + phantom gradients + 3-4 forward steps, or no
# training solve at all: 3-6x the baseline instead of 19x): none matched this setting's validation
# accuracy -- the best, 3 steps with weight 1, was 4.3 points lower on 9 of 10 seeds (docs/mmdynamics.md,
# "Cheaper DEQ training"); they stay opt-in through --option / --jac-weight.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "BRCA": {"jac_weight": adapter.PAPER_JAC_WEIGHT, "options": {}},
    "ROSMAP": {"jac_weight": 0.1, "options": {"f_max_iter": 12, "b_max_iter": 12}},
}
PROTOCOL_TEXT = {
    "upstream": "MM-Dynamics protocol: full training split, final model on the test split",
    "test-best": "best of the every-50-epoch TEST evaluations (the authors' DEQ release; optimistic, selects on test)",
    "val": "honest: checkpoint chosen on a validation split carved from training, reported on test",
    "val-final": "validation-split training, final model on test",
}


@dataclass(frozen=True)
class Row:
    key: str                                  # unique: "concat", "deq:full", "concat@0+1", ...
    title: str
    settings: adapter.Settings
    modalities: Optional[Tuple[int, ...]] = None
    table: str = "main"


def metric_columns(num_class: int) -> List[Tuple[str, str]]:
    cols = [("acc", "ACC"), ("f1_weighted", "F1 (weighted)"), ("f1_macro", "F1 (macro)")]
    if num_class == 2:
        cols += [("f1", "F1 (binary)"), ("auc", "AUC")]
    return cols


def build_rows(args: argparse.Namespace, ds: mogonet_data.DatasetSpec) -> List[Row]:
    defaults = DATASET_DEFAULTS[ds.name]
    deq_opts = dict(defaults["options"], **dict(args.option or {}))
    jac_weight = defaults["jac_weight"] if args.jac_weight is None else args.jac_weight
    base = adapter.Settings(fusion="concat")

    def deq(ablation: str) -> adapter.Settings:
        return adapter.Settings(fusion="deq", ablation=ablation, jac_weight=jac_weight, options=deq_opts)

    rows: List[Row] = []
    if not args.no_baseline:
        rows.append(Row("concat", "MM-Dynamics (concatenation)", base))
    if args.ablation is not None:
        chosen = args.ablation or list(ABLATION_ROWS)
        rows += [Row(f"deq:{a}", ABLATION_TITLES[a], deq(a), table="ablation") for a in chosen]
    else:
        rows.append(Row("deq:full", "DEQ fusion", deq("full")))
    if args.modalities:
        names = ds.view_names
        for pair in ((0, 1), (0, 2), (1, 2)):
            tag = "+".join(str(i) for i in pair)
            what = " + ".join(names[i] for i in pair)
            if not args.no_baseline:
                rows.append(Row(f"concat@{tag}", f"MM-Dynamics [{what}]", base, pair, "modalities"))
            rows.append(Row(f"deq:full@{tag}", f"DEQ fusion [{what}]", deq("full"), pair, "modalities"))
    return rows


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _option(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), adapter.parse_value(value.strip())


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce mmdynamics`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "mmdynamics", help="MM-Dynamics on MOGONET's BRCA / ROSMAP (paper Table 1, Tables 6/7, Fig. 3, Table 9)",
        description="Runs MM-Dynamics' own train_test.train() (pinned 7f04084, patched) for the concatenation "
                    "baseline and DEQ fusion on the same seeds; see docs/mmdynamics.md.",
        formatter_class=HelpFormatter)
    m.add_argument("--dataset", type=str.lower, choices=["rosmap", "brca"], default="brca")
    m.add_argument("--seeds", type=int, default=10, help="number of seeds (0..N-1)")
    m.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="explicit seeds, e.g. 3,5,7 (overrides --seeds)")
    m.add_argument("--protocol", choices=["upstream", "val", "both"], default="upstream",
                   help="upstream: MM-Dynamics' protocol (final model; the best-on-test number is also reported, "
                        "labelled); val: checkpoint selected on a validation split carved from training")
    m.add_argument("--val-fraction", type=float, default=0.2, help="share of the training split held out (val protocol)")
    m.add_argument("--ablation", nargs="*", choices=ABLATION_ROWS, default=None,
                   help="run the rows of the paper's Tables 6/7 (all rows when given without names)")
    m.add_argument("--modalities", action="store_true", help="also run the two-modality rows of Table 1")
    m.add_argument("--no-baseline", action="store_true", help="skip the concatenation baseline rows")
    m.add_argument("--jac-weight", type=float, default=None,
                   help="Jacobian loss weight (default: BRCA 20 as in the paper, ROSMAP 0.1)")
    m.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a DEQFusion option for the DEQ rows, e.g. --option f_max_iter=50 (repeatable); defaults: "
                        "BRCA f_max_iter=105 b_max_iter=106 (the paper), ROSMAP f_max_iter=12 b_max_iter=12")
    m.add_argument("--epochs", type=int, default=None, help="stop each run after N epochs (default: the upstream's)")
    m.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder holding the MOGONET dataset (or its parent); default ${mogonet_data.ENV_DATA}, "
                        "else download into the cache")
    m.add_argument("--no-download", action="store_true", help="never download; fail if the data is not local")
    m.add_argument("--no-verify", action="store_true", help="skip the git-blob hash checks (shape checks stay)")
    m.add_argument("--upstream", type=Path, default=None,
                   help="patched MM-Dynamics clone (default: where ./apply_patches.sh mmdynamics puts it: "
                        "$DEQFUSION_CLONES/mmdynamics or the checkout's third_party/mmdynamics)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda (cpu uses the .cuda() shim)")
    m.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (the documented numbers) avoids the large slowdown of "
                        "oversubscribed cores; 0 = torch's default")
    m.add_argument("--jobs", type=int, default=0,
                   help="training runs at once, each in its own process with --threads torch threads; "
                        "0 = one per --threads CPUs (1 on CUDA)")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/mmdynamics-<dataset>-<time>)")
    m.add_argument("--convergence", dest="convergence", action="store_true", default=True,
                   help="Fig. 3 / Table 9 for the first seed (adds one weight-tied training run)")
    m.add_argument("--no-convergence", dest="convergence", action="store_false")
    m.add_argument("--unroll-steps", type=int, default=7,
                   help="steps of the weight-tied (unrolled) model trained for Fig. 3")
    m.add_argument("--trace-steps", type=_positive_int, default=100, help="solver steps traced for Fig. 3 / Table 9")
    m.add_argument("--resume", action="store_true", help="reuse finished runs recorded in --out/results.json")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_mmdynamics)


# ------------------------------------------------------------------------------------------------
# aggregation and output


def summarize(runs: List[Dict[str, Any]], rows: List[Row], cols: List[Tuple[str, str]]) -> Dict[str, Dict[str, Any]]:
    """protocol -> row key -> {metric: {mean, std, n, values}, 'seeds': [...]}."""
    from .runner import mean_std

    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        for run in (r for r in runs if r["row"] == row.key):
            for proto, m in run["metrics"].items():
                entry = out.setdefault(proto, {}).setdefault(row.key, {"seeds": [], "values": {}})
                entry["seeds"].append(run["seed"])
                for key, _ in cols + [("epoch", "epoch")]:
                    entry["values"].setdefault(key, []).append(m.get(key, float("nan")))
    for proto in out.values():
        for entry in proto.values():
            entry["mean_std"] = {k: mean_std(v) for k, v in entry["values"].items()}
    return out


def _fmt(ms: Tuple[float, float]) -> str:
    return report.fmt_mean_std(*ms)


def render_tables(summary: Dict[str, Dict[str, Any]], rows: List[Row], cols: List[Tuple[str, str]],
                  ds: mogonet_data.DatasetSpec, protocols: Sequence[str]) -> str:
    lines: List[str] = []
    titles = {"main": "Table 1", "ablation": "Tables 6/7 (ablation)", "modalities": "Table 1 (two modalities)"}
    for table in ("main", "ablation", "modalities"):
        trows = [r for r in rows if r.table == table or (table == "ablation" and r.key == "concat" and
                                                         any(x.table == "ablation" for x in rows))]
        if not any(r.table == table for r in rows):
            continue
        for proto in protocols:
            if proto not in summary:
                continue
            n = max((len(summary[proto].get(r.key, {}).get("seeds", [])) for r in trows), default=0)
            lines.append(f"### {ds.name}: {titles[table]} — protocol `{proto}` ({report.plural(n, 'seed')})")
            lines.append("")
            lines.append(f"_{PROTOCOL_TEXT[proto]}._")
            lines.append("")
            head = ["method"] + [c[1] for c in cols]
            if proto in ("test-best", "val"):
                head.append("epoch")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for r in trows:
                e = summary[proto].get(r.key)
                if not e:
                    continue
                cells = [r.title] + [_fmt(e["mean_std"][k]) for k, _ in cols]
                if proto in ("test-best", "val"):
                    cells.append(f"{e['mean_std']['epoch'][0]:.0f}")
                lines.append("| " + " | ".join(cells) + " |")
                paper = PAPER_BRCA.get(r.key) if ds.name == "BRCA" and r.modalities is None else None
                if paper and proto == "upstream":
                    pcells = [f"{r.title} — paper"] + [f"{paper[k]:.1f}" if k in paper else "–" for k, _ in cols]
                    lines.append("| " + " | ".join(pcells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, summary: Dict[str, Dict[str, Any]], rows: List[Row], cols: List[Tuple[str, str]]) -> None:
    titles = {r.key: r.title for r in rows}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["protocol", "row", "title", "metric", "mean", "std", "n", "values"])
        for proto, entries in summary.items():
            for key, e in entries.items():
                for m, _ in cols + [("epoch", "epoch")]:
                    mean, std = e["mean_std"][m]
                    w.writerow([proto, key, titles.get(key, key), m, f"{mean:.4f}", f"{std:.4f}", len(e["values"][m]),
                                " ".join(f"{v:.4f}" for v in e["values"][m])])


# ------------------------------------------------------------------------------------------------
# convergence (Fig. 3, Table 9)


def convergence_report(curves: Dict[str, Any], out: Path, trace_steps: int) -> str:
    """Plot the mean relative residual per step with the 95% confidence band of the mean (±1.96 s/√n over
    the test samples; said in the figure) and return the Table 9 markdown."""
    import numpy as np

    lines = [f"### Table 9-style relative residuals ‖f(z)−z‖/‖f(z)‖ (test set, mean over samples, seed {curves['seed']})", ""]
    steps = [s for s in TABLE9_STEPS if s <= trace_steps]
    lines.append("| model / solver | " + " | ".join(f"step {s}" for s in steps) + " |")
    lines.append("|" + "---|" * (len(steps) + 1))
    with open(out / "convergence.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        names = list(curves["traces"])
        w.writerow(["step"] + names)
        arrays = {k: np.asarray(v) for k, v in curves["traces"].items()}
        for s in range(trace_steps):
            w.writerow([s + 1] + [f"{arrays[k][:, s].mean():.6e}" for k in names])
    for name, arr in arrays.items():
        lines.append(f"| {name} | " + " | ".join(f"{arr[:, s - 1].mean():.2e}" for s in steps) + " |")
    lines.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the [plot] / [test] extras
        lines.append("(matplotlib not installed: no convergence.png; the curves are in convergence.csv)")
        return "\n".join(lines)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    x = np.arange(1, trace_steps + 1)
    for name, arr in arrays.items():
        mean = arr.mean(0)
        half = 1.96 * arr.std(0) / np.sqrt(arr.shape[0])
        ax.plot(x, mean, label=name)
        ax.fill_between(x, np.clip(mean - half, 1e-12, None), mean + half, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("solver step")
    ax.set_ylabel("relative residual ‖f(z)−z‖ / ‖f(z)‖")
    ax.set_title(f"{curves['dataset']}: convergence of the fusion (test set, seed {curves['seed']})\n"
                 "line: mean over the test samples; shaded: 95% confidence band of that mean (±1.96 s/√n)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png")
    plt.close(fig)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the command


def _git_state(root: Path) -> Optional[str]:
    """The project's commit, with "+dirty" when core/ or adapters/ have uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "core", "adapters"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _environment(args: argparse.Namespace, upstream: Path) -> Dict[str, Any]:
    import torch

    from .runner import UPSTREAM_COMMIT

    root = Path(__file__).resolve().parents[2]
    patches = sorted((root / "patches" / "mmdynamics").glob("*.patch"))
    return {
        "deqfusion_commit": _git_state(root),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
        "upstream": str(upstream), "upstream_commit": UPSTREAM_COMMIT,
        "patches": [p.name for p in patches],
    }


def run_mmdynamics(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..common import run_pool
    from . import runner

    if args.threads:  # also for the convergence traces, which run outside the runner
        import torch

        torch.set_num_threads(args.threads)
    ds = mogonet_data.spec(args.dataset)
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not seeds:
        print("no seeds to run", file=sys.stderr)
        return 2
    try:
        upstream = runner.check_upstream(args.upstream)
        data_dir = mogonet_data.locate(
            ds.name, args.data_dir, download=not args.no_download, check_hashes=not args.no_verify,
            progress=lambda f: print(f"downloading {ds.name}/{f} ...", file=sys.stderr))
    except (runner.UpstreamError, mogonet_data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = build_rows(args, ds)
    protocols = ["upstream", "val"] if args.protocol == "both" else [args.protocol]
    # an upstream-protocol run also yields the (labelled, optimistic) best-on-test number
    report_protocols = (["upstream", "test-best"] if "upstream" in protocols else []) + (
        ["val"] if "val" in protocols else [])
    cols = metric_columns(ds.num_class)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"mmdynamics-{ds.name.lower()}-{stamp}"
    (out / "logs").mkdir(parents=True, exist_ok=True)

    runs: List[Dict[str, Any]] = []
    if args.resume and (out / "results.json").is_file():
        runs = json.loads((out / "results.json").read_text()).get("runs", [])
    done = {(r["row"], r["protocol"], r["seed"]) for r in runs}

    conv_seed = seeds[0]
    conv_row = next((r for r in rows if r.key == "deq:full"), None) if args.convergence else None
    wt_row = None
    if conv_row is not None:
        wt_row = Row(f"weight-tied:{args.unroll_steps}", f"weight-tied fusion (unrolled, {args.unroll_steps} steps)",
                     replace(conv_row.settings, options={**conv_row.settings.options, "mode": "unrolled",
                                                         "unroll_steps": args.unroll_steps}),
                     table="convergence")
    jobs_all: List[Tuple[Row, str, int]] = [(r, p, s) for r in rows for p in protocols for s in seeds]
    if wt_row is not None:
        jobs_all.append((wt_row, protocols[0], conv_seed))
    # the convergence analysis needs the trained models, so those runs are redone on --resume
    keep = {(conv_row.key, protocols[0], conv_seed), (wt_row.key, protocols[0], conv_seed)} if conv_row else set()
    todo = [j for j in jobs_all if (j[0].key, j[1], j[2]) not in done or (j[0].key, j[1], j[2]) in keep]
    runs = [r for r in runs if (r["row"], r["protocol"], r["seed"]) not in {(j[0].key, j[1], j[2]) for j in todo}]

    epochs = args.epochs or runner.UPSTREAM_HPARAMS[ds.name]["epochs"] + 1
    meta = {"command": "deqfusion " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("deqfusion") else " ".join(sys.argv),
            "dataset": ds.name, "data_dir": str(data_dir), "seeds": seeds, "protocols": protocols,
            "rows": [{"key": r.key, "title": r.title, "settings": r.settings.describe(),
                      "modalities": r.modalities, "table": r.table} for r in rows],
            "environment": _environment(args, upstream), "started": _dt.datetime.now().isoformat(timespec="seconds")}
    print(f"{ds.name}: {len(todo)} training runs ({len(rows)} rows x {len(protocols)} protocol(s) x {len(seeds)} seeds"
          + (", + 1 weight-tied run for Fig. 3" if wt_row is not None else "") + f"); output in {out}", file=sys.stderr)
    kept: Dict[str, Any] = {}
    t_start = time.perf_counter()

    def save(extra: Optional[Dict[str, Any]] = None) -> None:
        payload = dict(meta, runs=runs, wall_s=time.perf_counter() - t_start, **(extra or {}))
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out / "results.json")

    # longest runs first, so that parallel workers finish together: DEQ rows, the weight-tied run, baselines
    todo.sort(key=lambda j: (j[0].settings.fusion == "concat", j[0].table == "convergence"))
    tasks = [runner.Task(runner.RunSpec(dataset=ds.name, data_dir=data_dir, seed=seed, settings=row.settings,
                                          protocol=proto, val_fraction=args.val_fraction, modalities=row.modalities,
                                          epochs=args.epochs, device=args.device, threads=args.threads,
                                          keep_model=(row.key, proto, seed) in keep),
                         upstream=upstream, trace_steps=args.trace_steps)
             for row, proto, seed in todo]
    jobs = args.jobs or run_pool.default_jobs(args.threads, args.device, len(tasks))
    meta["jobs"] = jobs
    counted = [0] * len(tasks)
    finished = [False] * len(tasks)
    bar = tqdm(total=len(todo) * epochs, unit="epoch", disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix_str(f"{jobs} worker(s)")

    def on_epoch(i: int) -> None:
        if not finished[i]:
            counted[i] += 1
            bar.update(1)

    def on_done(i: int, result: Any) -> None:
        row, proto, seed = todo[i]
        finished[i] = True
        bar.update(max(0, epochs - counted[i]))  # runs may stop early; keep the bar honest
        rec = result.to_json()
        rec["row"] = row.key
        runs.append(rec)
        log_name = f"{row.key.replace(':', '-').replace('@', '-at-')}-{proto}-seed{seed}.log"
        (out / "logs" / log_name).write_text(result.upstream_log)
        if tasks[i].spec.keep_model:
            kept[row.key] = result
        bar.set_postfix_str(f"{jobs} worker(s); done {row.key} {proto} seed {seed}")
        save()

    try:
        run_pool.run_tasks(tasks, runner.execute, jobs=jobs, threads=args.threads, on_epoch=on_epoch, on_done=on_done)
    finally:
        bar.close()
    order = {(r.key, p, s): n for n, (r, p, s) in enumerate(jobs_all)}
    runs.sort(key=lambda r: order.get((r["row"], r["protocol"], r["seed"]), -1))

    summary = summarize(runs, rows, cols)
    text = render_tables(summary, rows, cols, ds, report_protocols)
    extra: Dict[str, Any] = {"summary": {p: {k: {m: list(v) for m, v in e["mean_std"].items()} for k, e in s.items()}
                                         for p, s in summary.items()}}
    if conv_row is not None and conv_row.key in kept and wt_row.key in kept:
        # Fig. 3: each kept run brought its traces back from where it was trained (runner.execute)
        curves = {"traces": {**kept[conv_row.key].traces, **kept[wt_row.key].traces}, "dataset": ds.name,
                  "seed": conv_seed}
        text += "\n" + convergence_report(curves, out, args.trace_steps)
        wt_metrics = kept[wt_row.key].metrics[protocols[0]]
        text += (f"\nWeight-tied model ({args.unroll_steps} unrolled steps, seed {conv_seed}, protocol `{protocols[0]}`): "
                 + ", ".join(f"{label} {wt_metrics[k]:.2f}" for k, label in cols if k in wt_metrics) + "\n")
        extra["convergence"] = {"seed": conv_seed, "steps": args.trace_steps,
                                "mean_rel_trace": {k: [float(x) for x in v.mean(0)] for k, v in curves["traces"].items()}}
    wall = time.perf_counter() - t_start
    per_row = {}
    for r in runs:
        per_row.setdefault(r["row"], []).append(r["wall_s"])
    timing = ["", f"Wall time: {wall / 60:.1f} min for {len(todo)} runs "
                  f"({jobs} at once, {meta['environment']['torch_threads']} torch thread(s) each, "
                  f"{meta['environment']['cpu_count']} CPUs).",
              "Mean time per run: " + ", ".join(f"{k} {sum(v) / len(v):.1f} s" for k, v in per_row.items()) + "."]
    text += "\n".join(timing) + "\n"
    header = (f"# MM-Dynamics reproduction: {ds.name}\n\n`{meta['command']}`\n\n"
              f"Upstream {meta['environment']['upstream_commit'][:7]} (patched), data {data_dir}, seeds {seeds}; "
              f"mean ± sample std (ddof=1) over seeds, metrics in %.\n\n"
              + "".join(f"- {r.title}: {r.settings.describe()}\n" for r in rows) + "\n")
    (out / "table.md").write_text(header + text)
    write_csv(out / "table.csv", summary, rows, cols)
    save(dict(extra, finished=_dt.datetime.now().isoformat(timespec="seconds"), total_wall_s=wall))
    print(text)
    written = ["table.md", "table.csv", "results.json"] + [n for n in ("convergence.csv", "convergence.png")
                                                           if "convergence" in extra and (out / n).is_file()]
    print(f"written: {out}/" + ", ".join(written))
    return 0
