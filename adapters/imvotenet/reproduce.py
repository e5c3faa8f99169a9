"""``deqfusion reproduce imvotenet``: the paper's Table 4 (SUN RGB-D) through ImVoteNet's own scripts.

    deqfusion reproduce imvotenet --data-dir /data/sunrgbd          # real SUN RGB-D (or $DEQFUSION_SUNRGBD)
    deqfusion reproduce imvotenet --generated                       # generated scenes: not a result

Two rows, each trained by the patched clone's ``train.py`` (the paper's 140-epoch schedule unless
``--epochs``) and scored by its ``eval.py`` with the README's evaluation flags: ImVoteNet as it is
(concatenation) and with DEQ fusion. The table gives mAP@0.25 and mAP@0.5 beside the paper's.
Everything a run printed is kept under ``--out`` (per row: train/eval output, the DEQ record,
the checkpoint), with ``results.json`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..common import report

# The paper's Table 4 (SUN RGB-D val, mAP in %): its ImVoteNet reproduction and + DEQ fusion.
PAPER_TABLE4 = {"concat": {"mAP@0.25": 61.9, "mAP@0.5": 45.6}, "deq": {"mAP@0.25": 62.7, "mAP@0.5": 46.4}}
TITLES = {"concat": "ImVoteNet (concatenation)", "deq": "ImVoteNet + DEQ fusion"}
METRICS = ("mAP@0.25", "mAP@0.5")
# --generated: small scenes and a short schedule, so that the whole command runs on a CPU in minutes
GENERATED_DEFAULTS = {"scenes": (8, 6), "epochs": 2, "batch_size": 2, "num_point": 4096, "num_workers": 0}


@dataclass(frozen=True)
class Row:
    key: str
    settings: Any


def _option(text: str) -> Tuple[str, Any]:
    from .. import imvotenet as adapter

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), adapter.parse_value(value.strip())


def _scenes(text: str) -> Tuple[int, int]:
    try:
        train, val = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL scene counts, got {text!r}") from None
    if train < 1 or val < 1:
        raise argparse.ArgumentTypeError("need at least one train and one val scene")
    return train, val


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce imvotenet`` to the ``reproduce`` command's subparsers."""
    m = sub.add_parser(
        "imvotenet", help="ImVoteNet on SUN RGB-D (paper Table 4: mAP@0.25 / mAP@0.5), its own train.py/eval.py",
        description="Trains the patched ImVoteNet clone (pinned a885634) with its own train.py, concatenation and "
                    "DEQ fusion, scores each checkpoint with its eval.py and prints Table 4; see docs/imvotenet.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--generated", action="store_true",
                   help="generated scenes in SUN RGB-D's layout (every number is labelled: not a result)")
    m.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding sunrgbd_pc_bbox_votes_50k_v1_{train,val}/, sunrgbd_2d_bbox_50k_v1_{train,val}/ "
                        "and sunrgbd_trainval/ (default $DEQFUSION_SUNRGBD, $DEQFUSION_DATA/sunrgbd, the clone's sunrgbd/)")
    m.add_argument("--generated-scenes", type=_scenes, default=GENERATED_DEFAULTS["scenes"], metavar="TRAIN,VAL",
                   help="scenes to generate with --generated")
    m.add_argument("--epochs", type=int, default=None, help="train.py --max_epoch (default: 140, the paper's "
                   f"schedule; {GENERATED_DEFAULTS['epochs']} with --generated); the decay epochs scale with it")
    m.add_argument("--batch-size", type=int, default=None, help="train.py/eval.py --batch_size (default 8, the "
                   f"README's; {GENERATED_DEFAULTS['batch_size']} with --generated)")
    m.add_argument("--num-point", type=int, default=None,
                   help=f"--num_point (default 20000; {GENERATED_DEFAULTS['num_point']} with --generated)")
    m.add_argument("--num-target", type=int, default=256, help="--num_target (proposals)")
    m.add_argument("--num-workers", type=int, default=None, help="train.py --num_workers (default 4; 0 with --generated)")
    m.add_argument("--jac-weight", type=float, default=None, help="Jacobian loss weight of the DEQ row (default 1.0)")
    m.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a DEQFusion option for the DEQ row, e.g. --option f_max_iter=30 (repeatable)")
    m.add_argument("--no-baseline", action="store_true", help="train only the DEQ row")
    m.add_argument("--seed", type=int, default=0, help="torch/numpy seed of each run (train.py re-seeds numpy itself)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda (cpu: the .cuda() shim and pure-PyTorch ops)")
    m.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    m.add_argument("--jobs", type=int, default=1, help="rows trained at once (each in its own processes)")
    m.add_argument("--python", default=None,
                   help="the Python that runs the upstream scripts (default: this one; needs the [imvotenet] extra)")
    m.add_argument("--upstream", type=Path, default=None,
                   help="patched ImVoteNet clone (default: where ./apply_patches.sh imvotenet puts it)")
    m.add_argument("--out", type=Path, default=None, help="output folder (default runs/imvotenet-<time>)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_imvotenet)


def build_rows(args: argparse.Namespace) -> List[Row]:
    from .. import imvotenet as adapter

    deq_kw: Dict[str, Any] = {"fusion": "deq", "options": dict(args.option or [])}
    if args.jac_weight is not None:
        deq_kw["jac_weight"] = args.jac_weight
    rows = [] if args.no_baseline else [Row("concat", adapter.Settings(fusion="concat"))]
    return rows + [Row("deq", adapter.Settings(**deq_kw))]


def render_table(results: Dict[str, Dict[str, Any]], generated: bool, what: str) -> str:
    """Table 4 in Markdown: our mAPs beside the paper's; with generated data every number of ours says so."""
    label = f" ({report.GENERATED})" if generated else ""
    head = ["method"] + [f"{m} (ours)" for m in METRICS] + [f"{m} (paper)" for m in METRICS]
    rows = []
    for key in ("concat", "deq"):
        if key not in results:
            continue
        ours = [f"{results[key]['maps'][m]:.2f}{label}" for m in METRICS]
        rows.append([TITLES[key]] + ours + [f"{PAPER_TABLE4[key][m]:.1f}" for m in METRICS])
    lines = ["### Table 4: 3D detection on SUN RGB-D val (mAP in %)", "", report.provenance_note(generated, what), ""]
    lines += report.markdown_table(head, rows)
    for key in ("deq",):
        deq = results.get(key, {}).get("deq")
        if deq:
            lines += ["", f"DEQ solver during training{label}: {deq['iterations']} iterations, mean "
                          f"{deq['nstep_mean']:.1f} forward steps per scene, worst relative residual "
                          f"{deq['rel_residual_max']:.3g}, status {deq['status']}."]
    return "\n".join(lines) + "\n"


def run_imvotenet(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from . import data as sunrgbd
    from . import runner

    def pick(value: Optional[int], key: str, default: int) -> int:
        return value if value is not None else (GENERATED_DEFAULTS[key] if args.generated else default)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("runs") / f"imvotenet-{stamp}").resolve()
    try:
        upstream = runner.check_upstream(args.upstream)
        if args.generated:
            train_n, val_n = args.generated_scenes
            data_root = sunrgbd.generate(out / "data", sunrgbd.GenSpec(train=train_n, val=val_n, seed=args.seed))
            what = f"{train_n} train / {val_n} val generated scenes in {data_root}"
        else:
            data_root = sunrgbd.resolve_data_root(args.data_dir, upstream)
            counts = sunrgbd.check_data(data_root)
            what = f"SUN RGB-D v1 in {data_root} ({counts['train']} train / {counts['val']} val scenes)"
    except (runner.UpstreamError, sunrgbd.DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    epochs = pick(args.epochs, "epochs", 140)
    if epochs < 1:
        print("error: --epochs must be >= 1", file=sys.stderr)
        return 2
    rows = build_rows(args)
    specs = {row.key: runner.RunSpec(
        settings=row.settings, data_root=data_root, epochs=epochs, batch_size=pick(args.batch_size, "batch_size", 8),
        num_point=pick(args.num_point, "num_point", 20000), num_target=args.num_target,
        num_workers=pick(args.num_workers, "num_workers", 4), seed=args.seed, device=args.device,
        threads=args.threads or None, python=args.python) for row in rows}
    print(f"imvotenet: {len(rows)} row(s), {epochs} epoch(s) each; {what}; output in {out}", file=sys.stderr)

    bar = tqdm(total=len(rows) * (epochs + 1), unit="step", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)

    def on_line(line: str) -> None:
        if line.startswith("**** EPOCH") or line.startswith("Loaded checkpoint"):
            bar.update(1)

    results: Dict[str, Dict[str, Any]] = {}
    meta = {"command": " ".join(sys.argv), "generated": args.generated, "data": what, "upstream": str(upstream),
            "upstream_commit": runner.UPSTREAM_COMMIT, "rows": {k: s.settings.describe() for k, s in specs.items()},
            "paper": PAPER_TABLE4, "started": _dt.datetime.now().isoformat(timespec="seconds")}

    def save() -> None:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(dict(meta, results=results), indent=1, default=str))
        os.replace(tmp, out / "results.json")

    def one(key: str) -> Tuple[str, Any]:
        return key, runner.run(specs[key], out / key, upstream, on_line=on_line)

    out.mkdir(parents=True, exist_ok=True)
    failed: List[str] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for fut in [pool.submit(one, row.key) for row in rows]:
                try:
                    key, res = fut.result()
                except runner.UpstreamError as err:
                    failed.append(str(err))
                    continue
                results[key] = res.to_json()
                save()
    finally:
        bar.close()
    if failed:
        print("error: " + "\n".join(failed), file=sys.stderr)
        return 1
    text = render_table(results, args.generated, what)
    (out / "table.md").write_text(f"# ImVoteNet reproduction\n\n`{meta['command']}`\n\n" + text)
    save()
    print(text)
    print(f"written: {out}/table.md, results.json")
    return 0

