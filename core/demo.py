"""`deqfusion demo`: train DEQ fusion and its weight-tied twin on generated data, then show how
each converges (the paper's Table 9 and Fig. 3) -- about a minute on a CPU with one torch thread.

The data: a latent class drives two modalities through different random nonlinear maps plus
noise, so fusing both beats either alone. Both models share encoders and head; one fuses with
DEQ (root solve + implicit backward), the other with a weight-tied network unrolled `--depth`
times. After training, each model's fusion map is iterated 100 times from zero and the
relative difference norm ||z[k+1] - z[k]|| / ||z[k+1]|| is traced per step.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Sequence

from .cli import REPORT

log = logging.getLogger(__name__)

TABLE_STEPS = (1, 10, 20, 40, 100)
_MODEL_NAMES = ("make_data", "Classifier", "train_model", "evaluate", "convergence_trace")


def __getattr__(name: str) -> Any:
    """The model pieces live in demo_model (torch is imported only when they are used)."""
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".demo_model", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_table(traces: Dict[str, Any], steps: Sequence[int] = TABLE_STEPS) -> str:
    """Table 9 format: relative difference norm at selected steps, one row per model."""
    head = "| model | " + " | ".join(f"step {s}" for s in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    rows = [f"| {name} | " + " | ".join(f"{float(tr[min(s, len(tr)) - 1]):.2e}" for s in steps) + " |"
            for name, tr in traces.items()]
    return "\n".join([head, rule, *rows])


def plot(traces: Dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing: no plot written (pip install 'deqfusion[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=130)
    for name, tr in traces.items():
        ax.semilogy(range(1, len(tr) + 1), tr.clamp_min(1e-12).numpy(), label=name)
    ax.set_xlabel("iteration k")
    ax.set_ylabel(r"$\|z^{[k+1]}-z^{[k]}\| / \|z^{[k+1]}\|$")
    ax.set_title("Convergence of the trained fusion maps (cf. paper Fig. 3)\n"
                 "mean over the test samples", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    import torch

    from .demo_model import Classifier, convergence_trace, evaluate, make_data, train_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    widths = (48, 32)
    data = make_data(args.samples, args.classes, widths, args.seed)
    models = {
        "DEQ fusion": dict(ablation="full", f_max_iter=args.max_iter, b_max_iter=args.max_iter),
        f"weight-tied ({args.depth} steps)": dict(ablation="full", mode="unrolled", unroll_steps=args.depth),
    }
    results: Dict[str, Dict[str, float]] = {}
    traces: Dict[str, torch.Tensor] = {}
    for name, opts in models.items():
        torch.manual_seed(args.seed)
        model = Classifier(widths, args.dim, args.classes, **opts)
        results[name] = train_model(model, data, steps=args.steps, batch=args.batch, lr=args.lr,
                                    jac_weight=args.jac_weight, seed=args.seed, label=name, progress=not args.quiet)
        results[name].update(evaluate(model, data))
        traces[name] = convergence_trace(model, data)
        results[name]["rel_diff"] = {str(s): float(traces[name][s - 1]) for s in TABLE_STEPS}
    report = logging.getLogger(REPORT)
    lines = ["Relative difference norm ||z[k+1]-z[k]|| / ||z[k+1]|| of the trained fusion map (paper Table 9 format):",
             format_table(traces), "", "| model | test acc | train time (s) |", "|---|---|---|"]
    lines += [f"| {name} | {100 * r['test_accuracy']:.1f} | {r['train_seconds']:.1f} |" for name, r in results.items()]
    report.info("\n".join(lines))
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (out_dir / "demo.json").write_text(json.dumps({"args": settings, "results": results}, indent=2))
    (out_dir / "table9.md").write_text(format_table(traces) + "\n")
    if plot(traces, out_dir / "convergence.png"):
        report.info(f"\nwrote {out_dir / 'convergence.png'}, {out_dir / 'demo.json'}, {out_dir / 'table9.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", aliases=["convergence"],
                       help="train DEQ fusion vs a weight-tied fusion on generated data; Table 9 and Fig. 3",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=4000, help="generated training samples")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--dim", type=int, default=64, help="fusion width")
    p.add_argument("--depth", type=int, default=10, help="unrolled steps of the weight-tied model")
    p.add_argument("--max-iter", type=int, default=20, help="forward and backward solver iterations of the DEQ model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--jac-weight", type=float, default=1.0, help="weight of the Jacobian term in the loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="folder for demo.json, table9.md, convergence.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as `reproduce`: on a loaded 2-core machine torch's default took "
                        "3 min 49 s against 19 s with one thread); 0 = torch's default")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
