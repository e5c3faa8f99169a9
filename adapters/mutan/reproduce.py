"""``deqfusion reproduce mutan``: the paper's Table 5 rows for Mutan, through block's own training entry.

    deqfusion reproduce mutan                          # real VQA-v2 data in the clone's data/ (block's layout)
    deqfusion reproduce mutan --data-root /data/block  # the same layout elsewhere
    deqfusion reproduce mutan --generated --quick      # generated data, tiny fusions, one epoch (minutes on CPU)

Two rows, each one ``python -m bootstrap.run`` (via ``deqfusion.adapters.mutan.run``) on the block clone:
Mutan (``options/mutan.yaml``: block's options with the fusion type fixed) and + DEQ
(``options/mutan_deq.yaml``).  Train on VQA-v2 train, evaluate on val, block's VQA evaluation; the epoch
is block's choice (best val top-1).  Prints Table 5 (Yes/no, Number, Other, Overall) with the paper's
numbers beside ours, and writes ``results.json`` and ``table.md``; each run's bootstrap logs stay in
``<out>/<row>/``.  On ``--generated`` data every number of ours is labelled "generated data, not a result".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..common import report

# The DEQ paper's Table 5 (VQA-v2), in %.
PAPER_TABLE5 = {
    "mutan": {"yes/no": 82.40, "number": 42.63, "other": 54.85, "overall": 63.73},
    "mutan_deq": {"yes/no": 82.91, "number": 45.40, "other": 55.70, "overall": 64.57},
}
ROWS = ("mutan", "mutan_deq")
TITLES = {"mutan": "Mutan", "mutan_deq": "+ DEQ"}
COLUMNS = (("yes/no", "Yes/no"), ("number", "Number"), ("other", "Other"), ("overall", "Overall"))
# DEQFusion options the shipped mutan_deq.yaml lists (bootstrap takes flags only for keys its options hold)
YAML_OPTIONS = ("f_solver", "f_max_iter", "f_tol", "b_solver", "b_max_iter", "b_tol", "jac_reg", "jac_probes", "dropout")


def _option(text: str) -> Tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = (part.strip() for part in text.split("=", 1))
    if key not in YAML_OPTIONS:
        raise argparse.ArgumentTypeError(
            f"{key!r} is not in mutan_deq.yaml's model.network.deq.options ({', '.join(YAML_OPTIONS)}); "
            "for another DEQFusion option write an options file that includes mutan_deq.yaml")
    return key, value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce mutan`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "mutan", help="Mutan on VQA-v2 (block.bootstrap.pytorch), baseline and + DEQ (paper Table 5)",
        description="Trains Mutan and Mutan + DEQ fusion with block.bootstrap.pytorch's own entry point "
                    "(python -m bootstrap.run, pinned e938e9e) and prints the paper's Table 5; see docs/mutan.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--generated", action="store_true",
                   help="generate VQA-v2-format data in block's layout under --out (numbers are not results)")
    m.add_argument("--quick", action="store_true",
                   help="smoke-test sizes: tiny fusions (mm_dim 64, rank 4; DEQ dim 64, 12/12 solver steps), "
                        "1 epoch unless --epochs, batch 16 unless --batch-size")
    m.add_argument("--data-root", type=Path, default=None,
                   help="folder in block's layout (vqa/vqa2, vqa/coco/extract_rcnn/..., skip-thoughts); "
                        "default: the clone's data/ (where block's download script puts it)")
    m.add_argument("--upstream", type=Path, default=None,
                   help="the block clone (default: where ./apply_patches.sh mutan puts it)")
    m.add_argument("--python", default=sys.executable,
                   help="the Python that has bootstrap.pytorch 0.0.13 and skipthoughts (pip install '.[mutan]')")
    m.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run: mutan, mutan_deq")
    m.add_argument("--epochs", type=int, default=None, help="epochs per row (default: the options' 22)")
    m.add_argument("--batch-size", type=int, default=None, help="default: the options' 64")
    m.add_argument("--seed", type=int, default=None, help="misc.seed (default: the options' 1337)")
    m.add_argument("--jac-weight", type=float, default=None, help="Jacobian loss weight of the + DEQ row (default 0.1)")
    m.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a DEQFusion option of the + DEQ row, e.g. --option f_max_iter=30 (repeatable)")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    m.add_argument("--threads", type=int, default=1, help="torch threads of each run (0: torch's default)")
    m.add_argument("--workers", type=int, default=0, help="DataLoader workers (dataset.nb_threads)")
    m.add_argument("--view", default=None, choices=["plotly", "tensorboard"],
                   help="bootstrap's view (default: the options' plotly, which needs plotly<4 and seaborn, as the "
                        "[mutan] extra installs; tensorboard needs tensorboardX only)")
    m.add_argument("--grad-log", action="store_true", help="record the answer fusion's gradients at every step")
    m.add_argument("--timeout", type=float, default=None, help="seconds per training run")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/mutan-<time>)")
    m.set_defaults(func=run_mutan)


def _cell(value: Optional[float], generated: bool) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:.2f}" + (f" ({report.GENERATED})" if generated else "")


def render_table(results: Dict[str, Dict[str, Any]], generated: bool, what: str) -> str:
    """Table 5: the paper's rows and ours side by side (ours labelled on generated data)."""
    lines = [f"### Table 5 (VQA-v2 val, block.bootstrap.pytorch): {what}", "", report.provenance_note(generated, what), ""]
    rows: List[List[str]] = []
    for key in ROWS:
        paper = PAPER_TABLE5[key]
        rows.append([f"{TITLES[key]} — paper (VQA-v2)"] + [f"{paper[c]:.2f}" for c, _ in COLUMNS])
        res = results.get(key)
        if res is not None:
            title = f"{TITLES[key]} — ours" + (f", {report.GENERATED}" if generated else "")
            epoch = res.get("best_epoch", -1)
            title += f" (epoch {epoch}, best val top-1)" if epoch >= 0 else ""
            rows.append([title] + [_cell(res.get("oe", {}).get(c), generated) for c, _ in COLUMNS])
    lines += report.markdown_table(["Mutan on VQA-v2"] + [c for _, c in COLUMNS], rows)
    return "\n".join(lines) + "\n"


def _deq_flags(args: argparse.Namespace) -> List[str]:
    flags: List[str] = []
    if args.jac_weight is not None:
        flags += ["--model.network.deq.jac_weight", repr(float(args.jac_weight))]
    for key, value in args.option:
        flags += [f"--model.network.deq.options.{key}", value]
    return flags


def run_mutan(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import data, runner

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        print(f"error: --rows takes {', '.join(ROWS)}; got {args.rows!r}", file=sys.stderr)
        return 2
    try:
        clone = runner.check_upstream(args.upstream)
    except runner.UpstreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("runs") / f"mutan-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    nans = None
    if args.generated:
        paths = data.DataPaths.from_root(out / "data")
        if data.read_generated(paths) is None:
            print(f"generating VQA-v2-format data in block's layout under {out / 'data'} ...", file=sys.stderr)
            sizes = dict(train_images=24, val_images=12, test_images=2) if args.quick else {}
            data.generate(paths, progress=True, **sizes)
        nans = int(data.read_generated(paths)["nans"])
    else:
        paths = data.DataPaths.from_root(args.data_root.resolve() if args.data_root else clone / "data")
        try:
            data.check(paths, clone)
        except data.DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if data.is_generated(paths):
            print(f"error: {paths.vqa_dir} holds generated data (it has {data.MARKER}); use --generated for it",
                  file=sys.stderr)
            return 2
    if args.device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    else:
        cuda = args.device == "cuda"
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else None)
    batch = args.batch_size if args.batch_size is not None else (16 if args.quick else None)
    what = "generated data in VQA-v2's format" if args.generated else f"VQA-v2 in {paths.vqa_dir}"
    meta: Dict[str, Any] = {"command": " ".join(["deqfusion", *sys.argv[1:]]), "upstream": str(clone),
                            "data": {k: str(v) for k, v in vars(paths).items()}, "generated": args.generated,
                            "started": _dt.datetime.now().isoformat(timespec="seconds")}
    results: Dict[str, Dict[str, Any]] = {}
    for row in tqdm(rows, desc="Mutan rows", unit="run", disable=not sys.stderr.isatty()):
        spec = runner.RunSpec(
            row=row, exp_dir=out / row, data=paths, nans=nans, epochs=epochs, batch_size=batch, cuda=cuda,
            threads=args.threads, workers=args.workers, seed=args.seed, quick=args.quick, view=args.view,
            flags=_deq_flags(args) if row == "mutan_deq" else (), grad_log=args.grad_log, python=args.python,
            timeout=args.timeout)
        try:
            result = runner.run(spec, clone)
        except runner.UpstreamError as err:
            print(f"error: {err}", file=sys.stderr)
            _write(out, meta, results, args.generated, what)
            return 1
        results[row] = result.to_json()
        _write(out, meta, results, args.generated, what)
    print(render_table(results, args.generated, what))
    print(f"results: {out / 'results.json'}, table: {out / 'table.md'}, bootstrap logs: {out}/<row>/")
    return 0


def _write(out: Path, meta: Dict[str, Any], results: Dict[str, Dict[str, Any]], generated: bool, what: str) -> None:
    payload = dict(meta, label=report.GENERATED if generated else "real data", runs=results, paper=PAPER_TABLE5)
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    (out / "table.md").write_text(render_table(results, generated, what), encoding="utf-8")

