"""The blocks' GroupNorm (a faster path for (B, C) states) against torch's own group_norm, the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqfusion.blocks import GroupNorm


@pytest.mark.parametrize("shape", [(7, 12), (5, 12, 3), (2, 12, 3, 4)])
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_groupnorm_equals_torch_group_norm_values_and_gradients(shape, groups):
    g = torch.Generator().manual_seed(groups)
    norm = GroupNorm(groups, shape[1]).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
    # a strided input, as the solver's (B, k*C) buffer gives each state
    x = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g, dtype=torch.float64)[:, : shape[1]]
    x.requires_grad_()
    ref = F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
    out = norm(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), [x, norm.weight, norm.bias], create_graph=True)
    grads_ref = torch.autograd.grad((ref * w).sum(), [x, norm.weight, norm.bias], create_graph=True)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)
    # second order (the Jacobian term differentiates a vector-Jacobian product)
    gg = torch.autograd.grad(grads[0].pow(2).sum(), x)[0]
    gg_ref = torch.autograd.grad(grads_ref[0].pow(2).sum(), x)[0]
    assert torch.allclose(gg, gg_ref, rtol=0, atol=1e-9)


def test_groupnorm_keeps_nn_groupnorm_parameters_and_state_dict():
    ours, theirs = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    assert isinstance(ours, nn.GroupNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    plain = GroupNorm(4, 16, affine=False)
    assert torch.allclose(plain(x), F.group_norm(x, 4), atol=1e-6)
