"""``deqfusion reproduce mcan``: the paper's Table 5 (VQA-v2 val) for MCAN, through MCAN's own ``run.py``.

    deqfusion reproduce mcan --data-dir /data/mcan/datasets          # real VQA-v2 + bottom-up features
    deqfusion reproduce mcan --generated                             # generated data: checks the pipeline only

Each seed trains MCAN-large with the sum (the upstream) and with DEQ fusion, on the train split,
evaluated on val after every epoch by MCAN's own evaluation (``--RUN='train' --MODEL='large'
--SPLIT='train'``, the paper's protocol); the table reports the final epoch's accuracy per answer
type (Yes/no, Number, Other, Overall), mean ± sample std over seeds, with the paper's numbers beside.
With ``--generated`` a data set of MCAN's exact layout is written first (:mod:`.data`) and every
number is labelled "generated data, not a result"; a tiny model (``runner.tiny_overrides``) is the
default there, so that it runs on a CPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import mcan as adapter
from ..common import report
from ..common.reproduce import HelpFormatter
from ..common.settings import ABLATION_ROWS

# The paper's Table 5 (VQA-v2 val, in %): Yes/no, Number, Other, Overall.
PAPER = {
    "sum": {"yes/no": 84.67, "number": 48.44, "other": 58.52, "overall": 67.02},
    "deq": {"yes/no": 85.17, "number": 49.07, "other": 58.69, "overall": 67.38},
}
COLUMNS = (("yes/no", "Yes/no"), ("number", "Number"), ("other", "Other"), ("overall", "Overall"))
TITLES = {"sum": "MCAN", "deq": "MCAN + DEQ fusion"}
# generated data: sizes that run in minutes on a CPU (see docs/vqa.md)
GENERATED_DEFAULTS = {"train_images": 1000, "val_images": 100, "test_images": 4, "per_image": 3, "feat_dim": 64}


@dataclass(frozen=True)
class Row:
    key: str              # "sum" or "deq"
    title: str
    settings: adapter.Settings


def _option(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), adapter.parse_value(value.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce mcan`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "mcan", help="MCAN-large on VQA-v2, sum vs DEQ fusion (paper Table 5)",
        description="Runs MCAN's own run.py (pinned 6b165e9, patched) with --RUN='train' --MODEL='large' "
                    "--SPLIT='train' for the sum baseline and DEQ fusion on the same seeds; see docs/vqa.md.",
        formatter_class=HelpFormatter)
    m.add_argument("--data-dir", type=Path, default=None,
                   help="MCAN's datasets/ folder (vqa/ and coco_extract/); default $DEQFUSION_MCAN_DATA")
    m.add_argument("--generated", action="store_true",
                   help="write generated data of MCAN's layout into --out (or use --data-dir if it holds generated "
                        "data) and label every number 'generated data, not a result'")
    m.add_argument("--seeds", type=_positive, default=1, help="number of seeds (0..N-1)")
    m.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=None,
                   help="explicit seeds, e.g. 3,5,7 (overrides --seeds)")
    m.add_argument("--epochs", type=_positive, default=None, help="--MAX_EPOCH (default: MCAN's 13)")
    m.add_argument("--batch-size", type=_positive, default=None, help="--BS (default: MCAN's 64)")
    m.add_argument("--size", choices=["large", "tiny"], default=None,
                   help="large: cfgs/large_model.yml as it is; tiny: runner.tiny_overrides() added to it "
                        "(default: large on real data, tiny on generated data)")
    m.add_argument("--model-option", type=_option, action="append", metavar="KEY=VALUE",
                   help="an entry added to cfgs/large_model.yml after --size's, e.g. --model-option HIDDEN_SIZE=32 "
                        "(any of MCAN's Cfgs names; repeatable)")
    m.add_argument("--no-baseline", action="store_true", help="skip the sum (upstream MCAN) rows")
    m.add_argument("--ablation", default="full", choices=ABLATION_ROWS, help="the DEQ row's ablation (paper Tables 6/7)")
    m.add_argument("--jac-weight", type=float, default=None,
                   help=f"per-sample Jacobian weight (default {adapter.DEFAULT_JAC_WEIGHT}; see docs/vqa.md)")
    m.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a DEQFusion option for the DEQ row, e.g. --option f_max_iter=30 (repeatable)")
    m.add_argument("--log-every", type=int, default=None,
                   help=f"a solver-statistics line every N fusion forwards (default {adapter.DEFAULT_LOG_EVERY})")
    m.add_argument("--vectors", choices=["auto", "real", "standin"], default="auto",
                   help="en_vectors_web_lg: real (spaCy 2 GloVe), standin (deterministic, not GloVe), auto; real "
                        "data needs real vectors unless standin is named explicitly")
    m.add_argument("--upstream", type=Path, default=None,
                   help="patched MCAN clone (default: where ./apply_patches.sh mcan puts it)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda (cpu uses the .cuda() shim)")
    m.add_argument("--threads", type=int, default=1, help="torch threads (MCAN asks for 2; 0 = as MCAN asks)")
    m.add_argument("--workers", type=int, default=0, help="--NW, data loader processes")
    m.add_argument("--keep-checkpoints", action="store_true", help="keep MCAN's per-epoch checkpoints (ckpts/)")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/mcan-<time>)")
    m.add_argument("--resume", action="store_true", help="reuse finished runs recorded in --out/results.json")
    m.add_argument("--echo", action="store_true", help="show MCAN's own output")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    for key in ("train_images", "val_images", "feat_dim"):
        m.add_argument(f"--{key.replace('_', '-')}", type=_positive, default=None,
                       help=f"generated data: {key.replace('_', ' ')} (default {GENERATED_DEFAULTS[key]})")
    m.set_defaults(func=run_mcan)


# ------------------------------------------------------------------------------------------------


def build_rows(args: argparse.Namespace) -> List[Row]:
    deq_opts = dict(args.option or {})
    extra: Dict[str, Any] = {}
    if args.log_every is not None:
        extra["log_every"] = args.log_every
    rows = []
    if not args.no_baseline:
        rows.append(Row("sum", TITLES["sum"], adapter.Settings(fusion="sum", **extra)))
    jac = adapter.DEFAULT_JAC_WEIGHT if args.jac_weight is None else args.jac_weight
    title = TITLES["deq"] + ("" if args.ablation == "full" else f" [{args.ablation}]")
    rows.append(Row("deq", title, adapter.Settings(fusion="deq", ablation=args.ablation, jac_weight=jac,
                                                   options=deq_opts, **extra)))
    return rows


def summarize(runs: List[Dict[str, Any]], rows: List[Row]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row.key]
        if mine:
            out[row.key] = {"seeds": [r["seed"] for r in mine],
                            "mean_std": {k: report.mean_std(r["accuracy"].get(k) for r in mine)[:2] for k, _ in COLUMNS}}
    return out


def render(summary: Dict[str, Dict[str, Any]], rows: List[Row], generated: bool, prior: Optional[Dict[str, float]],
           what: str) -> str:
    label = f" ({report.GENERATED})" if generated else ""
    n = max((len(e["seeds"]) for e in summary.values()), default=0)
    lines = [f"### MCAN on VQA-v2 val, paper Table 5 format{label} — {report.plural(n, 'seed')}", "",
             report.provenance_note(generated, what), "",
             "_Final epoch of `run.py --RUN='train' --MODEL='large' --SPLIT='train'` (train split, evaluated on val "
             "by MCAN's own evaluation); VQA accuracy in %, mean ± sample std over seeds._", ""]
    body: List[List[str]] = []
    for row in rows:
        e = summary.get(row.key)
        if e:
            body.append([row.title + label] + [report.fmt_mean_std(*e["mean_std"][k]) for k, _ in COLUMNS])
        paper = PAPER.get(row.key) if row.settings.ablation == "full" or row.key == "sum" else None
        if paper:
            body.append([f"{TITLES[row.key]} — paper"] + [f"{paper[k]:.2f}" for k, _ in COLUMNS])
    if prior is not None:
        body.append([f"image-blind prior: each question type's most common training answer{label}"]
                    + [f"{prior[k]:.2f}" for k, _ in COLUMNS])
    lines += report.markdown_table(["method"] + [c for _, c in COLUMNS], body)
    return "\n".join(lines) + "\n"


def _fusion_note(runs: List[Dict[str, Any]]) -> str:
    lines = []
    for r in runs:
        last = r["epochs"][-1] if r["epochs"] else {}
        tr, ev = last.get("fusion_train", {}), last.get("fusion_eval", {})
        if tr or ev:
            lines.append(f"- seed {r['seed']} ({r['row']}), last epoch: train solver steps mean {tr.get('nstep_mean', 0):.1f} "
                         f"max {tr.get('nstep_max', 0)}, worst rel residual {tr.get('rel_residual_max', 0):.2e}, "
                         f"jac_loss {tr.get('jac_loss_mean', float('nan')):.4g}, adjoint steps mean "
                         f"{tr.get('backward_nstep_mean', float('nan')):.1f}; eval steps mean {ev.get('nstep_mean', 0):.1f}, "
                         f"status {ev.get('status', {})}")
    return ("DEQ fusion solver statistics (MCAN's log carries the per-window lines):\n" + "\n".join(lines) + "\n") if lines else ""


def _count_train(root: Path) -> int:
    from . import data as mcan_data

    return len(json.loads((root / "vqa" / mcan_data.ANSWER_FILES["train"]).read_text())["annotations"])


def run_mcan(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("numpy", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: deqfusion reproduce mcan needs {', '.join(missing)} (MCAN imports it), not "
              f"installed: pip install 'deqfusion[mcan]'", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from ..common import vqa2
    from . import data as mcan_data
    from . import runner

    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"mcan-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        upstream = runner.check_upstream(args.upstream)
        if args.generated:
            root = args.data_dir
            if root is None or mcan_data.generated_info(root) is None:
                root = out / "data"
                if mcan_data.generated_info(root) is None:
                    spec = mcan_data.GeneratedSpec(**{k: getattr(args, k) or GENERATED_DEFAULTS[k]
                                                      for k in ("train_images", "val_images", "feat_dim")},
                                                   test_images=GENERATED_DEFAULTS["test_images"],
                                                   per_image=GENERATED_DEFAULTS["per_image"])
                    print(f"writing generated data ({report.GENERATED}) to {root}", file=sys.stderr)
                    mcan_data.write_generated(root, spec)
        else:
            root = mcan_data.locate(args.data_dir)
        mcan_data.check_layout(root, "train")
    except (runner.UpstreamError, mcan_data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = mcan_data.generated_info(root)
    generated = info is not None
    if generated and not args.generated:
        print(f"note: {root} holds generated data ({mcan_data.MARKER}); every number is labelled as such", file=sys.stderr)
    vectors = args.vectors
    if not generated and vectors == "auto":
        vectors = "real"  # real data: GloVe or an explicit choice of the stand-in
    if vectors == "real" and not runner.compat.real_vectors_available():
        print(f"error: the GloVe vectors MCAN loads are not installed: {runner.compat.GLOVE_FIX}; or pass "
              f"--vectors standin (deterministic vectors, not GloVe; the table says so)", file=sys.stderr)
        return 2
    size = args.size or ("tiny" if generated else "large")
    overrides = runner.tiny_overrides(mcan_data.feature_dim(root)) if size == "tiny" else {}
    overrides.update(dict(args.model_option or {}))
    epochs, batch = args.epochs, args.batch_size
    rows = build_rows(args)

    runs: List[Dict[str, Any]] = []
    if args.resume and (out / "results.json").is_file():
        runs = json.loads((out / "results.json").read_text()).get("runs", [])
    done = {(r["row"], r["seed"]) for r in runs}
    todo = [(row, s) for s in seeds for row in rows if (row.key, s) not in done]
    per_epoch = _count_train(root) // (batch or 64)
    n_epochs = epochs or 13
    meta = {"command": "deqfusion " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("deqfusion") else " ".join(sys.argv),
            "data": str(root), "generated": generated, "generator": info, "seeds": seeds, "size": size,
            "model_overrides": overrides, "vectors": vectors, "epochs": n_epochs, "batch_size": batch or 64,
            "rows": [{"key": r.key, "title": r.title, "settings": r.settings.describe()} for r in rows],
            "environment": _environment(upstream), "started": _dt.datetime.now().isoformat(timespec="seconds")}
    t_start = time.perf_counter()

    def save(extra: Optional[Dict[str, Any]] = None) -> None:
        payload = dict(meta, runs=runs, wall_s=time.perf_counter() - t_start, **(extra or {}))
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out / "results.json")

    print(f"MCAN: {len(todo)} training runs ({len(rows)} rows x {len(seeds)} seeds, {n_epochs} epochs each); "
          f"output in {out}", file=sys.stderr)
    bar = tqdm(total=len(todo) * n_epochs * max(per_epoch, 1), unit="step", disable=args.quiet, dynamic_ncols=True,
               file=sys.stderr)
    (out / "logs").mkdir(exist_ok=True)
    try:
        for row, seed in todo:
            bar.set_postfix_str(f"{row.key} seed {seed}")
            spec = runner.RunSpec(root, row.settings, seed=seed, epochs=epochs, batch_size=batch,
                                  num_workers=args.workers, model_overrides=overrides, vectors=vectors,
                                  device=args.device, threads=args.threads or None)
            work = out / "work" / spec.run_version()
            if work.exists():
                shutil.rmtree(work)
            try:
                result = runner.run(spec, upstream, workdir=work, echo=args.echo, on_step=lambda: bar.update(1),
                                    on_epoch=lambda e, k=row.key, s=seed: bar.set_postfix_str(f"{k} seed {s} epoch {e['epoch']}"))
            except (runner.UpstreamError, mcan_data.DataError, runner.compat.CompatError) as err:
                print(f"\nerror: {err}", file=sys.stderr)
                return 2
            if not args.keep_checkpoints:
                shutil.rmtree(work / "ckpts", ignore_errors=True)
            rec = result.to_json()
            (out / "logs" / f"{result.version}.log").write_text(rec.pop("log_text"))
            (out / "logs" / f"{result.version}.stdout").write_text(rec.pop("stdout"))
            rec["row"] = row.key
            runs.append(rec)
            save()
    finally:
        bar.close()
    order = {(r.key, s): i for i, (s, r) in enumerate((s, r) for s in seeds for r in rows)}
    runs.sort(key=lambda r: order.get((r["row"], r["seed"]), -1))
    summary = summarize(runs, rows)
    prior = vqa2.prior_accuracy(mcan_data.read_qas(root, "train"), mcan_data.read_qas(root, "val")) if generated else None
    what = (f"{root}: {info['questions']['train']} train / {info['questions']['val']} val questions" if generated
            else f"{root}")
    text = render(summary, rows, generated, prior, what)
    text += "\n" + _fusion_note(runs)
    wall = time.perf_counter() - t_start
    if not generated and any(r["vectors"] == "standin" for r in runs):
        text += "\n**Word vectors: the deterministic stand-in, not GloVe** (--vectors standin): not the paper's setting.\n"
    text += (f"\nModel: MCAN-large{' shrunk by ' + json.dumps(overrides) if overrides else ''}; word vectors: "
             f"{sorted({r['vectors'] for r in runs})}; {n_epochs} epochs, batch {batch or 64}; wall time {wall / 60:.1f} min.\n")
    header = (f"# MCAN reproduction (paper Table 5)\n\n`{meta['command']}`\n\nUpstream {runner.UPSTREAM_COMMIT[:7]} "
              f"(patched), data {root}, seeds {seeds}.\n\n" + "".join(f"- {r.title}: {r.settings.describe()}\n" for r in rows)
              + "\n")
    (out / "table.md").write_text(header + text)
    save({"summary": {k: {m: list(v) for m, v in e["mean_std"].items()} for k, e in summary.items()},
          "prior": prior, "finished": _dt.datetime.now().isoformat(timespec="seconds"), "total_wall_s": wall})
    print(text)
    print(f"written: {out}/table.md, results.json, logs/")
    return 0


def _environment(upstream: Path) -> Dict[str, Any]:
    import torch

    root = Path(__file__).resolve().parents[2]
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "upstream": str(upstream),
            "patches": sorted(p.name for p in (root / "patches" / "mcan").glob("*.patch"))}
