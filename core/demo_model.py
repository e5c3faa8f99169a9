"""The model and data of `deqfusion demo`: two generated modalities, encoders, a fusion, a head.

Kept apart from demo.py (the command line), so that `deqfusion --help` imports no torch.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch
from torch import nn

from .layer import DEQFusion
from .solvers import SolverStats


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
