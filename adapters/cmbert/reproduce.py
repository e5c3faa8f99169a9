"""``deqfusion reproduce cmbert``: the paper's Table 3 (CMU-MOSI) through CM-BERT's own loop.

    deqfusion reproduce cmbert                              # CM-BERT vs CM-BERT + DEQ, 5 seeds, real BERT
    deqfusion reproduce cmbert --ablation                   # the ablation rows (core ablation names)
    deqfusion reproduce cmbert --random-bert --epochs 1 --rows 96,24,24 --seeds 1   # pipeline check, no download

Each row is ``run_classifier.main`` (pinned 3e44dce, patched) run once per seed -- the upstream
runs it 5 times with random seeds and reports the mean; here the seeds are 0..N-1 and each drawn
upstream seed is recorded.  The table gives mean ± sample std (ddof=1) of the upstream's own
test metrics (Acc-2 = ``acc``, F1, MAE, Corr, Acc-7) beside the paper's numbers.  Numbers from
a random BERT are labelled "random BERT, not a result", numbers from the generated audio pickle
"generated data, not a result".  Writes ``results.json``, ``table.md``, ``table.csv`` and the
upstream's log of every run under ``--out``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import cmbert as adapter
from ..common import report

# The paper's Table 3 (CMU-MOSI): Acc-7 / Acc-2 / F1 in %, MAE, Corr.  The CM-BERT row is also the
# upstream README's (T+A).
PAPER_TABLE3 = {
    "sum": {"acc7": 44.9, "acc": 84.5, "F1": 84.5, "mae": 0.729, "corr": 0.791},
    "deq:full": {"acc7": 46.1, "acc": 85.4, "F1": 85.4, "mae": 0.737, "corr": 0.797},
}
COLUMNS: Tuple[Tuple[str, str, float, int], ...] = (  # key, header, scale, digits
    ("acc7", "Acc-7", 100.0, 1), ("acc", "Acc-2", 100.0, 1), ("F1", "F1", 100.0, 1),
    ("mae", "MAE", 1.0, 3), ("corr", "Corr", 1.0, 3),
)
ABLATION_ROWS = ("weighted_sum", "no_deq", "modality_deq", "fusion_deq", "full", "no_gate")
ABLATION_TITLES = {
    "weighted_sum": "weighted sum of the maps (no f_θ, no f_fuse, no DEQ)",
    "no_deq": "f_θ + f_fuse, one pass (no DEQ)",
    "modality_deq": "f_θ + DEQ (fused = Σ z_i)",
    "fusion_deq": "f_fuse + DEQ (f_θ = identity)",
    "full": "CM-BERT + DEQ fusion (full)",
    "no_gate": "DEQ fusion without gate (purify removed)",
}
RANDOM_BERT = "random BERT, not a result"


@dataclass(frozen=True)
class Row:
    key: str                  # "sum", "deq:full", "deq:no_gate", ...
    title: str
    settings: adapter.Settings
    table: str = "main"


def build_rows(args: argparse.Namespace) -> List[Row]:
    opts = dict(args.option or {})
    jac = adapter.PAPER_JAC_WEIGHT if args.jac_weight is None else args.jac_weight

    def deq(ablation: str) -> adapter.Settings:
        return adapter.Settings(fusion="deq", ablation=ablation, jac_weight=jac, options=opts)

    rows: List[Row] = []
    if not args.no_baseline:
        rows.append(Row("sum", "CM-BERT (simple addition)", adapter.Settings(fusion="sum")))
    if args.ablation is not None:
        rows += [Row(f"deq:{a}", ABLATION_TITLES[a], deq(a), table="ablation") for a in (args.ablation or ABLATION_ROWS)]
    else:
        rows.append(Row("deq:full", "CM-BERT + DEQ fusion", deq("full")))
    return rows


def _rows_arg(text: str) -> Tuple[int, int, int]:
    parts = [int(p) for p in text.split(",") if p.strip()]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected TRAIN,DEV,TEST row counts (each >= 1), got {text!r}")
    return parts[0], parts[1], parts[2]


def _option(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), adapter.parse_value(value.strip())


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce cmbert`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "cmbert", help="CM-BERT on CMU-MOSI (paper Table 3; --ablation: the ablation rows)",
        description="Runs CM-BERT's own run_classifier.main (pinned 3e44dce, patched) for the simple-addition "
                    "baseline and DEQ fusion on the same seeds; see docs/cmbert.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1); the upstream runs main() 5 times")
    m.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="explicit seeds, e.g. 3,5,7 (overrides --seeds)")
    m.add_argument("--ablation", nargs="*", choices=ABLATION_ROWS, default=None,
                   help="run the ablation rows (all when given without names), named as the core's ablations")
    m.add_argument("--no-baseline", action="store_true", help="skip the simple-addition baseline")
    m.add_argument("--bert", type=Path, default=None,
                   help="CM-BERT's BERT folder (bert_config.json, pytorch_model.bin, vocab.txt); default: the clone's "
                        "'pre-trained BERT' (make it with python -m deqfusion.adapters.cmbert.convert)")
    m.add_argument("--random-bert", action="store_true",
                   help="use a small random BERT in CM-BERT's format instead (no download; numbers are not results)")
    m.add_argument("--jac-weight", type=float, default=None, help="Jacobian loss weight (default 0.01, the paper's)")
    m.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a DEQFusion option for the DEQ rows, e.g. --option f_max_iter=30 (repeatable); defaults: "
                        "f_max_iter=105 b_max_iter=106 num_groups=1")
    m.add_argument("--epochs", type=float, default=None, help="run_classifier's --num_train_epochs (default: its 3)")
    m.add_argument("--rows", type=_rows_arg, default=None, metavar="TRAIN,DEV,TEST",
                   help="use only the first rows of each split (default: all 1284/229/686)")
    m.add_argument("--batch-size", type=int, default=None, help="train/eval/test batch size (default: the upstream's 24)")
    m.add_argument("--audio", type=Path, default=None,
                   help="CM-BERT's MOSI_cmu_audio_CLS.pickle (default: the clone's data/audio/, or $DEQFUSION_CMBERT_AUDIO)")
    m.add_argument("--no-generate-audio", action="store_true",
                   help="fail instead of generating a stand-in when the audio pickle is missing")
    m.add_argument("--no-verify", action="store_true", help="skip the data's git-blob hash checks")
    m.add_argument("--upstream", type=Path, default=None,
                   help="patched CM-BERT clone (default: where ./apply_patches.sh cmbert puts it)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda")
    m.add_argument("--threads", type=int, default=1, help="torch threads per run (0 = torch's default)")
    m.add_argument("--jobs", type=int, default=0, help="runs at once (0 = one per --threads CPUs; 1 on CUDA)")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/cmbert-<time>)")
    m.add_argument("--resume", action="store_true", help="reuse finished runs recorded in --out/results.json")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_cmbert)


# ------------------------------------------------------------------------------------------------
# tables


def summarize(runs: Sequence[Dict[str, Any]], rows: Sequence[Row]) -> Dict[str, Dict[str, Any]]:
    """row key -> {"seeds": [...], "values": {metric: [...]}, "mean_std": {metric: (mean, std)}} (metrics scaled)."""
    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        entry: Dict[str, Any] = {"seeds": [], "values": {k: [] for k, *_ in COLUMNS}}
        for run in (r for r in runs if r["row"] == row.key):
            entry["seeds"].append(run["seed"])
            for key, _, scale, _ in COLUMNS:
                v = run["metrics"].get(key)
                entry["values"][key].append(float("nan") if v is None else scale * float(v))
        entry["mean_std"] = {k: report.mean_std(v)[:2] for k, v in entry["values"].items()}
        out[row.key] = entry
    return out


def labels_for(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The not-a-result labels every number of these runs carries."""
    out = []
    if any(r["data"]["bert_source"].get("kind") == "random" for r in runs):
        out.append(RANDOM_BERT)
    if any(r["data"].get("audio_generated") for r in runs):
        out.append(report.GENERATED)
    return out


def render_tables(summary: Dict[str, Dict[str, Any]], rows: Sequence[Row], labels: Sequence[str]) -> str:
    lines: List[str] = []
    note = "; ".join(labels)
    for table, title in (("main", "Table 3 (CMU-MOSI)"), ("ablation", "ablation rows (CMU-MOSI)")):
        trows = [r for r in rows if r.table == table or (table == "ablation" and r.key == "sum")]
        if not any(r.table == table for r in rows):
            continue
        n = max((len(summary[r.key]["seeds"]) for r in trows), default=0)
        lines.append(f"### {title}, {report.plural(n, 'seed')}" + (f" — **{note}**" if note else ""))
        lines.append("")
        if labels:
            lines.append("_Every number from this run is labelled: " + note + "._")
            lines.append("")
        header = ["method"] + [c[1] for c in COLUMNS] + (["note"] if labels else [])
        body: List[List[str]] = []
        for r in trows:
            e = summary[r.key]
            if not e["seeds"]:
                continue
            cells = [r.title] + [report.fmt_mean_std(*e["mean_std"][k], digits=d) for k, _, _, d in COLUMNS]
            body.append(cells + ([note] if labels else []))
            paper = PAPER_TABLE3.get(r.key) if table == "main" else None
            if paper:
                body.append([f"{r.title} — paper"] + [f"{paper[k]:.{d}f}" for k, _, _, d in COLUMNS]
                            + (["(paper)"] if labels else []))
        lines += report.markdown_table(header, body)
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, summary: Dict[str, Dict[str, Any]], rows: Sequence[Row], labels: Sequence[str]) -> None:
    titles = {r.key: r.title for r in rows}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "title", "metric", "mean", "std", "n", "values", "label"])
        for key, e in summary.items():
            for m, *_ in COLUMNS:
                mean, std = e["mean_std"][m]
                w.writerow([key, titles.get(key, key), m, f"{mean:.4f}", f"{std:.4f}", len(e["values"][m]),
                            " ".join(f"{v:.4f}" for v in e["values"][m]), "; ".join(labels)])


# ------------------------------------------------------------------------------------------------
# the command


def _environment(args: argparse.Namespace, upstream: Path) -> Dict[str, Any]:
    import torch

    from .runner import UPSTREAM_COMMIT

    root = Path(__file__).resolve().parents[2]
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
            "upstream": str(upstream), "upstream_commit": UPSTREAM_COMMIT,
            "patches": [p.name for p in sorted((root / "patches" / "cmbert").glob("*.patch"))]}


def log_name(row_key: str, seed: int) -> str:
    return f"{row_key.replace(':', '-')}-seed{seed}.log"


def resolve_bert(args: argparse.Namespace, upstream: Path, out: Path) -> Path:
    """--bert, else (--random-bert) a small random BERT under --out, else the clone's 'pre-trained BERT'."""
    from . import convert
    from . import data as mosi
    from .runner import BERT_LINK

    if args.bert is not None:
        return convert.check_folder(args.bert)
    if args.random_bert:
        folder = out / "random-bert"
        if not (folder / convert.WEIGHTS_NAME).is_file():
            texts = [line.decode("utf-8").split("\t")[0]
                     for line in mosi.read_tsv_lines(upstream / mosi.TEXT_DIR / "train.tsv")[1:]]
            convert.random_bert(folder, texts, force=True)
        return folder
    return convert.check_folder(upstream / BERT_LINK)


def run_cmbert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..common import run_pool
    from . import convert, runner
    from . import data as mosi

    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not seeds:
        print("no seeds to run", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"cmbert-{stamp}"
    try:
        upstream = runner.check_upstream(args.upstream)
        mosi.check_text(upstream / mosi.TEXT_DIR, verify=not args.no_verify)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        bert = resolve_bert(args, upstream, out)
    except (runner.UpstreamError, mosi.DataError, convert.ConvertError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = build_rows(args)
    runs: List[Dict[str, Any]] = []
    if args.resume and (out / "results.json").is_file():
        runs = json.loads((out / "results.json").read_text()).get("runs", [])
    done = {(r["row"], r["seed"]) for r in runs}
    todo = [(row, seed) for row in rows for seed in seeds if (row.key, seed) not in done]
    todo.sort(key=lambda j: j[0].settings.fusion == "sum")  # DEQ runs (the longer ones) first
    epochs = args.epochs if args.epochs is not None else runner.UPSTREAM_HPARAMS["num_train_epochs"]
    tasks = [runner.Task(runner.RunSpec(bert_dir=bert, seed=seed, settings=row.settings, epochs=epochs, rows=args.rows,
                                        batch_size=args.batch_size, audio=args.audio,
                                        generate_audio=not args.no_generate_audio, verify=not args.no_verify,
                                        device=args.device, threads=args.threads), upstream=upstream,
                         log_file=out / "logs" / log_name(row.key, seed))
             for row, seed in todo]
    jobs = args.jobs or run_pool.default_jobs(args.threads, args.device, len(tasks))
    meta = {"command": " ".join(["deqfusion"] + sys.argv[1:]) if sys.argv[0].endswith("deqfusion") else " ".join(sys.argv),
            "seeds": seeds, "bert": str(bert), "bert_source": convert.folder_source(bert), "epochs": epochs,
            "rows_per_split": args.rows, "jobs": jobs,
            "rows": [{"key": r.key, "title": r.title, "settings": r.settings.describe(), "table": r.table} for r in rows],
            "environment": _environment(args, upstream), "started": _dt.datetime.now().isoformat(timespec="seconds")}
    print(f"CMU-MOSI: {len(todo)} runs ({len(rows)} rows x {len(seeds)} seeds, {epochs:g} epochs each, {jobs} at once); "
          f"BERT {bert} ({meta['bert_source'].get('kind')}); output in {out}", file=sys.stderr)
    t_start = time.perf_counter()

    def save(extra: Optional[Dict[str, Any]] = None) -> None:
        payload = dict(meta, runs=runs, wall_s=time.perf_counter() - t_start, **(extra or {}))
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out / "results.json")

    rows_train = args.rows[0] if args.rows else mosi.ROWS["train"]
    per_run = runner.train_steps(rows_train, args.batch_size, epochs)
    counted = [0] * len(tasks)
    bar = tqdm(total=len(tasks) * per_run, unit="step", disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix_str(f"{jobs} worker(s)")

    def on_step(i: int) -> None:
        if counted[i] < per_run:
            counted[i] += 1
            bar.update(1)

    def on_done(i: int, result: Any) -> None:
        row, seed = todo[i]
        bar.update(per_run - counted[i])
        counted[i] = per_run
        rec = result.to_json()
        rec.pop("upstream_log")  # already in logs/, written while the run went
        rec["row"] = row.key
        runs.append(rec)
        bar.set_postfix_str(f"{jobs} worker(s); done {row.key} seed {seed}")
        save()

    try:
        run_pool.run_tasks(tasks, runner.execute, jobs=jobs, threads=args.threads, on_epoch=on_step, on_done=on_done)
    finally:
        bar.close()
    order = {(r.key, s): n for n, (r, s) in enumerate((r, s) for r in rows for s in seeds)}
    runs.sort(key=lambda r: order.get((r["row"], r["seed"]), -1))
    kept = [r for r in runs if (r["row"], r["seed"]) in order]
    summary = summarize(kept, rows)
    labels = labels_for(kept)
    text = render_tables(summary, rows, labels)
    wall = time.perf_counter() - t_start
    text += (f"\nWall time {wall / 60:.1f} min for {len(todo)} runs ({jobs} at once, "
             f"{meta['environment']['torch_threads']} torch thread(s) each).\n")
    header = (f"# CM-BERT reproduction: CMU-MOSI\n\n`{meta['command']}`\n\n"
              f"Upstream {meta['environment']['upstream_commit'][:7]} (patched); BERT {bert} "
              f"({meta['bert_source'].get('kind')}); seeds {seeds}; {epochs:g} epochs; rows "
              f"{args.rows or 'all (1284/229/686)'}; mean ± sample std (ddof=1) over seeds; Acc-7, Acc-2, F1 in %.\n\n"
              + "".join(f"- {r.title}: {r.settings.describe()}\n" for r in rows) + "\n")
    (out / "table.md").write_text(header + text)
    write_csv(out / "table.csv", summary, rows, labels)
    save({"summary": {k: {m: list(v) for m, v in e["mean_std"].items()} for k, e in summary.items()},
          "labels": labels, "finished": _dt.datetime.now().isoformat(timespec="seconds"), "total_wall_s": wall})
    print(text)
    print(f"written: {out}/table.md, table.csv, results.json, logs/")
    return 0
