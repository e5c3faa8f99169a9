"""`deqfusion demo`: train DEQ fusion and its weight-tied twin on generated data, then show how
each converges (the paper's Table 9 and Fig. 3) -- a few minutes on a CPU.

The data: a latent class drives two modalities through different random nonlinear maps plus
noise, so fusing both beats either alone. Both models share encoders and head; one fuses with
DEQ (root solve + implicit backward), the other with a weight-tied network unrolled `--depth`
times. After training, each model's fusion map is iterated 100 times from zero and the
relative difference norm ||z[k+1] - z[k]|| / ||z[k+1]|| is traced per step.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

from .cli import REPORT
from .layer import DEQFusion
from .solvers import SolverStats

log = logging.getLogger(__name__)

TABLE_STEPS = (1, 10, 20, 40, 100)


def make_data(n: int, num_classes: int, widths: Sequence[int], seed: int):
    """Two modalities from one latent class, each through its own random 2-layer map, plus noise."""
    g = torch.Generator().manual_seed(seed)
    latent_dim = 16
    centers = torch.randn(num_classes, latent_dim, generator=g) * 1.5
    maps = [(torch.randn(latent_dim, 64, generator=g) / 4, torch.randn(64, w, generator=g) / 8) for w in widths]

    def sample(count: int, gen: torch.Generator):
        y = torch.randint(num_classes, (count,), generator=gen)
        z = centers[y] + torch.randn(count, latent_dim, generator=gen)
        xs = []
        for i, (a, b) in enumerate(maps):
            keep = torch.rand(count, latent_dim, generator=gen) > 0.5   # each modality sees half the latent
            x = torch.tanh((z * keep) @ a) @ b
            xs.append(x + (0.5 + 0.5 * i) * torch.randn(count, x.shape[1], generator=gen))
        return xs, y

    train = sample(n, g)
    test = sample(n // 2, torch.Generator().manual_seed(seed + 1))
    return train, test


class Classifier(nn.Module):
    """Per-modality MLP encoders -> fusion -> linear head."""

    def __init__(self, widths: Sequence[int], dim: int, num_classes: int, **fusion_options):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(w, dim), nn.ReLU(), nn.Linear(dim, dim)) for w in widths)
        self.fusion = DEQFusion(dim, len(widths), **fusion_options)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, xs: List[torch.Tensor]):
        fused, jac_loss, stats = self.fusion([enc(x) for enc, x in zip(self.encoders, xs)])
        return self.head(fused), jac_loss, stats


def train_model(model: Classifier, data, *, steps: int, batch: int, lr: float, jac_weight: float, seed: int,
                label: str, progress: bool) -> Dict[str, float]:
    from tqdm.auto import tqdm

    (xs, y), _ = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(steps), desc=f"train {label}", disable=not progress, leave=False)
    start = time.perf_counter()
    for _ in bar:
        idx = torch.randint(len(y), (batch,), generator=g)
        logits, jac, stats = model([x[idx] for x in xs])
        loss = nn.functional.cross_entropy(logits, y[idx]) + jac_weight * jac
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", steps=int(stats.nstep.max()) if stats.nstep.numel() else 0)
    return {"train_seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: Classifier, data) -> Dict[str, float]:
    _, (xs, y) = data
    model.eval()
    logits, _, stats = model(xs)
    out = {"test_accuracy": float((logits.argmax(1) == y).float().mean())}
    if stats.nstep.numel() and stats.solver != "none":
        out.update(mean_solver_steps=float(stats.nstep.float().mean()), converged_fraction=float(stats.converged.float().mean()))
    return out


@torch.no_grad()
def convergence_trace(model: Classifier, data, iters: int = 100) -> torch.Tensor:
    """Mean relative difference norm per step when the trained fusion map is iterated from zero."""
    _, (xs, _) = data
    fusion = model.fusion
    probe = DEQFusion(fusion.config.dim, fusion.config.num_modalities, ablation=fusion.config.ablation,
                      block_residual=fusion.config.block_residual, mode="unrolled", unroll_steps=iters)
    probe.load_state_dict(fusion.state_dict())
    probe.eval()
    stats: SolverStats = probe([enc(x) for enc, x in zip(model.encoders, xs)]).stats
    return stats.rel_trace.mean(0)


def format_table(traces: Dict[str, torch.Tensor], steps: Sequence[int] = TABLE_STEPS) -> str:
    """Table 9 format: relative difference norm at selected steps, one row per model."""
    head = "| model | " + " | ".join(f"step {s}" for s in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    rows = [f"| {name} | " + " | ".join(f"{float(tr[min(s, len(tr)) - 1]):.2e}" for s in steps) + " |"
            for name, tr in traces.items()]
    return "\n".join([head, rule, *rows])


def plot(traces: Dict[str, torch.Tensor], path: Path) -> bool:
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
    ax.set_title("Convergence of the trained fusion maps (cf. paper Fig. 3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
