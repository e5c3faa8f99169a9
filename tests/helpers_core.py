"""Shared builders for the core tests: small, contractive DEQ fusion instances."""
from __future__ import annotations

import pytest
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


def unpack_state(fusion, flat: torch.Tensor, spatial=()):
    """The layer's flat (B, D) state (`stats.state`, `z_init`, `fixed_point_map`) as its list of
    states z_1..z_N (rows with f_theta), z_fuse (rows with f_fuse): (B, k, dim, *spatial) flattened."""
    return list(flat.view(flat.shape[0], -1, fusion.config.dim, *spatial).unbind(1))


def pack_states(states) -> torch.Tensor:
    """The inverse of unpack_state."""
    return torch.stack(list(states), dim=1).reshape(states[0].shape[0], -1)


def forward_and_fixed_point(fusion, xs, **kwargs):
    """fusion(xs, **kwargs), and the solved joint state (`stats.state`: the state the output is
    read from, f(z*) for the solver's iterate z*) as the layer's list of states."""
    out = fusion(xs, **kwargs)
    assert out.stats.state is not None, "a DEQ solve reports its state in stats.state"
    return out, unpack_state(fusion, out.stats.state.detach(), tuple(xs[0].shape[2:]))


@pytest.fixture
def one_thread():
    """Run the test with one torch thread and put the count back. The float64 instances here are
    tiny, so threads add only synchronisation; with both cores busy elsewhere, 2 threads made
    test_default_tolerances_give_accurate_gradients take 188 s instead of 1.2 s (measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
