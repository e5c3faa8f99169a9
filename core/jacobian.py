"""Jacobian regularisation: a Hutchinson estimate of ||df/dz||_F^2 at the fixed point."""
from __future__ import annotations

import torch


def jacobian_frobenius(fz: torch.Tensor, z: torch.Tensor, probes: int = 2, create_graph: bool = True) -> torch.Tensor:
    """E_v ||v^T J||^2 / numel, v ~ N(0, I): ||J||_F^2 per element of the state (Bai et al., 2021).

    `fz = f(z)` must have been computed with `z.requires_grad_()`. With create_graph the estimate
    is differentiable w.r.t. the parameters of f, which is what makes it a regulariser.
    """
    wide = torch.promote_types(fz.dtype, torch.float32)
    total = fz.new_zeros((), dtype=wide)
    for _ in range(probes):
        v = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.to(wide).pow(2).sum()
    return total / (probes * fz.numel())
