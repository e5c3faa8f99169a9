"""Shared builders for the core tests: small, contractive DEQ fusion instances."""
from __future__ import annotations

import torch

from deqfusion import DEQFusion


def contractive_fusion(dim: int = 16, n: int = 2, scale: float = 0.5, dtype=torch.float64, seed: int = 0, **options):
    """A DEQFusion whose map contracts (its linear weights scaled down), so plain iteration converges."""
    torch.manual_seed(seed)
    fusion = DEQFusion(dim, n, **options).to(dtype)
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(scale)
            elif "norm" in name:                       # non-trivial affine GroupNorm parameters
                p.add_(0.1 * torch.randn_like(p))
    return fusion


def inputs(batch: int, dims, dtype=torch.float64, seed: int = 1, spatial=()):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, *spatial, generator=g, dtype=dtype) for d in dims]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
