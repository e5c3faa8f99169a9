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


def perturbed(fusion, seed: int = 0):
    """Non-trivial GroupNorm affine parameters and x_fuse weights (their init, 1 and 0, would hide
    a missing or swapped term), in place; returns the fusion."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            if "norm" in name or name in ("modality_weights", "fuse_bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return fusion


def forward_capturing_fixed_point(fusion, xs, monkeypatch):
    """fusion(xs), and the joint state its forward solve returned, unpacked into the layer's list
    of states (z_1..z_N, z_fuse). The solver's result is read by wrapping the `solve` that
    deqfusion.layer calls (the backward's adjoint solve lives in deqfusion.backward: not seen)."""
    import deqfusion.layer as layer

    seen = []
    real = layer.solve

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[0].detach().clone())
        return out

    monkeypatch.setattr(layer, "solve", spy)
    out = fusion(xs)
    monkeypatch.setattr(layer, "solve", real)
    assert len(seen) == 1, f"expected one forward solve, saw {len(seen)}"
    like = xs[0].new_empty(1, fusion.config.dim, *xs[0].shape[2:])        # (dim, *spatial) per state
    _, unpack = fusion._packers(like)
    return out, list(unpack(seen[0]))
