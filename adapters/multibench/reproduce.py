"""``deqfusion reproduce multibench``: the paper's Table 2 (MM-IMDB) through MultiBench's own example.

    deqfusion reproduce multibench --data /path/to/multimodal_imdb.hdf5          # Table 2: late fusion vs DEQ
    deqfusion reproduce multibench --data ... --ablation                          # Table 8 rows (DEQFusion ablations)
    deqfusion reproduce multibench --generated                                    # pipeline check, not a result

Every row runs the patched ``examples/multimedia/mmimdb_simple_late_fusion.py`` of the clone through
:mod:`.runner` with the same seeds: the late-fusion baseline is the upstream example as it is
(concatenation, AdamW lr 8e-3); the DEQ rows use the paper's settings (Jacobian weight 0.1, lr 1e-3
with the fusion at 1e-4, at most 105 forward / 106 adjoint solver steps).  The command prints micro
and macro F1 on the test split in the paper's Table 2 format with the paper's numbers beside ours,
and writes ``table.md``, ``results.json`` and the upstream's log of every run.

``--generated`` writes a small ``multimodal_imdb.hdf5`` of the release's format (see :mod:`.data`) and
runs the same rows on it; every number it prints is labelled "generated data, not a result".
Imports of torch, h5py and the upstream happen inside :func:`run_multibench`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..common import report
from ..common.settings import ABLATION_ROWS, ABLATION_TITLES, parse_value

# The paper's Table 2 (MM-IMDB, Word2vec + VGG features; micro / macro F1 in %).
PAPER_TABLE2 = {"concat": {"micro": 59.02, "macro": 50.27}, "deq:full": {"micro": 61.52, "macro": 53.38}}
# Table 8 holds the paper's ablation of the fusion on MM-IMDB; its numbers could not be read on the machines this
# was built on, so the table leaves the paper column empty (docs/multibench.md maps its rows to ours).
PAPER_TABLE8: Dict[str, Dict[str, float]] = {}
METRICS = (("micro", "Micro-F1"), ("macro", "Macro-F1"))
# --generated: a small file and a short schedule, so that the check takes minutes on a CPU (not a result).
GENERATED_DEFAULTS: Dict[str, Any] = {"n_train": 512, "n_dev": 128, "n_test": 256, "epochs": 8, "num_workers": 0,
                                      "options": {"f_max_iter": 20, "b_max_iter": 20}}
REAL_DATA = "MM-IMDB (multimodal_imdb.hdf5)"
PAPER_DATA = "paper, MM-IMDB"


@dataclass(frozen=True)
class Row:
    key: str            # "concat", "deq:full", "deq:no_gate", ...
    title: str
    settings: Any       # deqfusion.adapters.multibench.Settings
    table: str = "main"  # "main" (Table 2) or "ablation" (Table 8)


def build_rows(args: argparse.Namespace) -> List[Row]:
    """The rows to train: the late-fusion baseline, DEQ fusion, and with --ablation the Table 8 rows."""
    from .. import multibench as adapter

    options = dict(GENERATED_DEFAULTS["options"] if args.generated else {})
    options.update(dict(args.option or {}))
    kw: Dict[str, Any] = {"options": options}
    for name in ("jac_weight", "lr", "fusion_lr"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)

    rows: List[Row] = []
    if not args.no_baseline:
        rows.append(Row("concat", "Late fusion (MultiBench: concatenation)", adapter.Settings(fusion="concat")))
    if args.ablation is not None:
        for name in args.ablation or ABLATION_ROWS:
            rows.append(Row(f"deq:{name}", ABLATION_TITLES[name], adapter.Settings(ablation=name, **kw), "ablation"))
    else:
        rows.append(Row("deq:full", "DEQ fusion", adapter.Settings(ablation="full", **kw)))
    return rows


def _option(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce multibench`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "multibench", help="MultiBench's MM-IMDB late fusion vs DEQ fusion (paper Table 2; --ablation: Table 8)",
        description="Runs MultiBench's own examples/multimedia/mmimdb_simple_late_fusion.py (pinned 49f9be2, patched) "
                    "for late fusion and DEQ fusion on the same seeds; see docs/multibench.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--data", type=Path, default=None,
                   help="multimodal_imdb.hdf5 (default $DEQFUSION_MULTIBENCH_DATA, else $DEQFUSION_DATA/multimodal_imdb.hdf5)")
    m.add_argument("--generated", action="store_true",
                   help="generate a small file of the release's format and run on it (numbers are not results)")
    m.add_argument("--gen-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=None, metavar="TR,DEV,TE",
                   help=f"--generated: train,dev,test sizes (default {GENERATED_DEFAULTS['n_train']},"
                        f"{GENERATED_DEFAULTS['n_dev']},{GENERATED_DEFAULTS['n_test']})")
    m.add_argument("--ablation", nargs="*", choices=ABLATION_ROWS, default=None,
                   help="run the Table 8 rows (DEQFusion ablations; all rows when given without names)")
    m.add_argument("--no-baseline", action="store_true", help="skip the late-fusion (concatenation) row")
    m.add_argument("--seeds", type=_positive, default=1, help="number of seeds (0..N-1)")
    m.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="explicit seeds, e.g. 0,1,2 (overrides --seeds)")
    m.add_argument("--epochs", type=_positive, default=None,
                   help="cap train()'s epochs (default: the example's 1000 with early stopping; "
                        f"--generated: {GENERATED_DEFAULTS['epochs']})")
    m.add_argument("--batch-size", type=_positive, default=None, help="batch size (default: the example's 128)")
    m.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: get_dataloader's 8; --generated: 0)")
    m.add_argument("--jac-weight", type=float, default=None, help="Jacobian loss weight of the DEQ rows (default 0.1)")
    m.add_argument("--lr", type=float, default=None,
                   help="lr of encoders and head in the DEQ rows (default 1e-3; the baseline keeps the example's 8e-3)")
    m.add_argument("--fusion-lr", type=float, default=None, help="lr of the fusion's parameters (default 1e-4)")
    m.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a DEQFusion option for the DEQ rows (repeatable); default f_max_iter=105 b_max_iter=106 "
                        "(the paper), --generated: f_max_iter=20 b_max_iter=20")
    m.add_argument("--upstream", type=Path, default=None,
                   help="patched MultiBench clone (default: where ./apply_patches.sh multibench puts it)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda (cpu uses the .cuda() shim)")
    m.add_argument("--threads", type=int, default=1, help="torch threads per run (0 = torch's default)")
    m.add_argument("--jobs", type=int, default=0,
                   help="runs at once, each in its own process; 0 = one per --threads CPUs (1 on CUDA)")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/multibench-<time>)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_multibench)


# ------------------------------------------------------------------------------------------------
# aggregation and output


def summarize(runs: List[Dict[str, Any]], rows: Sequence[Row]) -> Dict[str, Dict[str, Any]]:
    """row key -> {'seeds', 'values': {metric: [...]}, 'mean_std': {metric: (mean, std)}, 'epochs', 'best'}."""
    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row.key]
        if not mine:
            continue
        values = {k: [r["metrics"][k] for r in mine] for k, _ in METRICS}
        out[row.key] = {"seeds": [r["seed"] for r in mine], "values": values,
                        "mean_std": {k: report.mean_std(v)[:2] for k, v in values.items()},
                        "epochs": [r["epochs_trained"] for r in mine], "best": [r["best_epoch"] for r in mine],
                        "solver": [r["fusion_test"] for r in mine if r.get("fusion_test")]}
    return out


def _solver_cell(entries: List[Dict[str, Any]]) -> str:
    if not entries:
        return "–"
    steps = sum(e["nstep_mean"] for e in entries) / len(entries)
    worst = max(e["rel_residual_max"] for e in entries)
    conv = sum(e["status"].get("converged", 0) for e in entries)
    total = sum(e["samples"] for e in entries)
    return f"{steps:.1f} steps, {100 * conv / max(total, 1):.0f}% converged, worst rel {worst:.1e}"


def render_tables(summary: Dict[str, Dict[str, Any]], rows: Sequence[Row], generated: bool) -> str:
    """Table 2 (and Table 8) in the paper's format: our rows with the paper's beside them."""
    ours = report.GENERATED if generated else REAL_DATA
    lines: List[str] = []
    titles = {"main": "MM-IMDB, paper Table 2 (late fusion vs DEQ fusion)",
              "ablation": "MM-IMDB, paper Table 8 rows (ablations of the fusion)"}
    for table in ("main", "ablation"):
        trows = [r for r in rows if r.table == table or (table == "ablation" and r.key == "concat"
                                                         and any(x.table == "ablation" for x in rows))]
        if not any(r.table == table for r in rows) or (table == "main" and any(r.table == "ablation" for r in rows)):
            continue  # with --ablation, the baseline is a row of the Table 8 table
        n = max((len(summary.get(r.key, {}).get("seeds", [])) for r in trows), default=0)
        lines += [f"### {titles[table]} — MultiBench's protocol ({report.plural(n, 'seed')})", ""]
        lines.append(f"_{report.provenance_note(generated, 'multimodal_imdb.hdf5 written by the generator')}_"
                     if generated else "_Real data: the MM-IMDB release (multimodal_imdb.hdf5); checkpoint with the "
                                       "best validation macro-F1, test split._")
        lines.append("")
        body = []
        paper = PAPER_TABLE2 if table == "main" else PAPER_TABLE8
        for r in trows:
            e = summary.get(r.key)
            if e:
                epochs = ", ".join(f"{a} ({b})" for a, b in zip(e["epochs"], e["best"]))
                body.append([r.title, ours] + [report.fmt_mean_std(*e["mean_std"][k]) for k, _ in METRICS]
                            + [epochs, _solver_cell(e["solver"])])
            ref = paper.get(r.key) or PAPER_TABLE2.get(r.key)  # Table 8 repeats Table 2's two rows
            if ref is not None:
                body.append([f"{r.title} — paper", PAPER_DATA] + [f"{ref[k]:.2f}" for k, _ in METRICS] + ["", ""])
        lines += report.markdown_table(["method", "data"] + [label for _, label in METRICS]
                                       + ["epochs (best)", "DEQ solve on test"], body)
        if table == "ablation" and not PAPER_TABLE8:
            lines += ["", "_The paper's Table 8 numbers of the other rows are not printed here: they could not be read "
                          "where this was built (docs/multibench.md, \"Table 8\")._"]
        lines.append("")
    return "\n".join(lines)


def _git_state(root: Path) -> Optional[str]:
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "core", "adapters", "patches"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def run_multibench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..common import run_pool
    from . import data as mmimdb
    from . import runner

    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not seeds:
        print("no seeds to run", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"multibench-{'generated-' if args.generated else ''}{stamp}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        upstream = runner.check_upstream(args.upstream)
        if args.generated:
            sizes = args.gen_sizes or (GENERATED_DEFAULTS["n_train"], GENERATED_DEFAULTS["n_dev"],
                                       GENERATED_DEFAULTS["n_test"])
            if len(sizes) != 3:
                raise mmimdb.DataError(f"--gen-sizes takes train,dev,test, got {sizes}")
            print(f"generating {mmimdb.FILE_NAME} ({sizes[0]}/{sizes[1]}/{sizes[2]} movies) in {out}/generated",
                  file=sys.stderr)
            path = mmimdb.generate(out / "generated" / mmimdb.FILE_NAME, n_train=sizes[0], n_dev=sizes[1],
                                   n_test=sizes[2])
        else:
            path = mmimdb.locate(args.data)
            info = mmimdb.check_file(path, require_upstream_layout=True)
            if info.generated:
                raise mmimdb.DataError(f"{path} was written by deqfusion's generator; pass --generated for a "
                                       f"pipeline check, or the real file for results")
    except (runner.UpstreamError, mmimdb.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = build_rows(args)
    epochs = args.epochs or (GENERATED_DEFAULTS["epochs"] if args.generated else None)
    num_workers = args.num_workers if args.num_workers is not None else (
        GENERATED_DEFAULTS["num_workers"] if args.generated else None)
    jobs_all = [(row, seed) for row in rows for seed in seeds]
    # longest first: DEQ rows, then the baseline
    jobs_all.sort(key=lambda j: j[0].settings.fusion == "concat")
    tasks = [runner.Task(runner.RunSpec(data=path, seed=seed, settings=row.settings, epochs=epochs,
                                        batch_size=args.batch_size, num_workers=num_workers, device=args.device,
                                        threads=args.threads or None), upstream=upstream)
             for row, seed in jobs_all]
    jobs = args.jobs or run_pool.default_jobs(args.threads, args.device, len(tasks))
    import torch

    meta: Dict[str, Any] = {
        "command": "deqfusion " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("deqfusion") else " ".join(sys.argv),
        "data": str(path), "generated": bool(args.generated), "seeds": seeds, "epochs_cap": epochs, "jobs": jobs,
        "rows": [{"key": r.key, "title": r.title, "settings": r.settings.describe(), "table": r.table} for r in rows],
        "environment": {"deqfusion_commit": _git_state(Path(__file__).resolve().parents[2]),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "upstream": str(upstream), "upstream_commit": runner.UPSTREAM_COMMIT},
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    print(f"MM-IMDB{' (generated data, not a result)' if args.generated else ''}: {len(tasks)} training runs "
          f"({len(rows)} rows x {len(seeds)} seeds, {jobs} at once); output in {out}", file=sys.stderr)
    runs: List[Dict[str, Any]] = []
    t_start = time.perf_counter()

    def save(extra: Optional[Dict[str, Any]] = None) -> None:
        payload = dict(meta, runs=runs, wall_s=time.perf_counter() - t_start, **(extra or {}))
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out / "results.json")

    counted = [0] * len(tasks)
    finished = [False] * len(tasks)
    bar = tqdm(total=len(tasks) * epochs if epochs else None, unit="epoch", disable=args.quiet, dynamic_ncols=True,
               file=sys.stderr)
    bar.set_postfix_str(f"{jobs} worker(s)")

    def on_epoch(i: int) -> None:
        if not finished[i]:
            counted[i] += 1
            bar.update(1)

    def on_done(i: int, result: Any) -> None:
        row, seed = jobs_all[i]
        finished[i] = True
        if epochs:
            bar.update(max(0, epochs - counted[i]))  # early stopping: keep the bar honest
        rec = result.to_json()
        log = rec.pop("upstream_log")
        rec["row"] = row.key
        runs.append(rec)
        (out / "logs" / f"{row.key.replace(':', '-')}-seed{seed}.log").write_text(log)
        bar.set_postfix_str(f"{jobs} worker(s); done {row.key} seed {seed}")
        save()

    try:
        run_pool.run_tasks(tasks, runner.execute, jobs=jobs, threads=args.threads, on_epoch=on_epoch, on_done=on_done)
    finally:
        bar.close()
    order = {(r.key, s): n for n, (r, s) in enumerate((r, s) for r in rows for s in seeds)}
    runs.sort(key=lambda r: order.get((r["row"], r["seed"]), -1))
    summary = summarize(runs, rows)
    wall = time.perf_counter() - t_start
    text = render_tables(summary, rows, args.generated)
    per_row: Dict[str, List[float]] = {}
    for r in runs:
        per_row.setdefault(r["row"], []).append(r["wall_s"])
    text += (f"\nWall time: {wall / 60:.1f} min for {len(tasks)} runs ({jobs} at once, {args.threads or 'default'} "
             f"torch thread(s) each, {os.cpu_count()} CPUs). Mean time per run: "
             + ", ".join(f"{k} {sum(v) / len(v):.1f} s" for k, v in per_row.items()) + ".\n")
    header = (f"# MultiBench reproduction: MM-IMDB{' — ' + report.GENERATED if args.generated else ''}\n\n"
              f"`{meta['command']}`\n\nUpstream {runner.UPSTREAM_COMMIT[:7]} (patched) `{runner.EXAMPLE}`, data {path}, "
              f"seeds {seeds}; mean ± sample std (ddof=1) over seeds, F1 in %.\n\n"
              + "".join(f"- {r.title}: {r.settings.describe()}\n" for r in rows) + "\n")
    (out / "table.md").write_text(header + text)
    save({"summary": {k: {m: list(v) for m, v in e["mean_std"].items()} for k, e in summary.items()},
          "finished": _dt.datetime.now().isoformat(timespec="seconds"), "total_wall_s": wall})
    print(text)
    print(f"written: {out}/table.md, results.json, logs/")
    return 0
