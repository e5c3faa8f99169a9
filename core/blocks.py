"""The maps whose joint fixed point DEQ fusion finds (paper Eqs. 8-12).

Features are channel-first, (B, C) or (B, C, *spatial); linear maps act on the channel axis and
GroupNorm normalises each sample on its own, so no sample's result depends on the batch.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelLinear", "GroupNorm", "ModalityBlock", "FusionBlock"]

_ROW_BLOCK = 4


class ChannelLinear(nn.Linear):
    """nn.Linear over the channel axis (dim 1) of a (B, C, *spatial) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            rows = x.shape[0]
            pad = -rows % _ROW_BLOCK
            if pad and x.device.type == "cpu":
                # CPU BLAS computes GEMM rows in blocks (4 for MKL on x86) and the leftover rows
                # with another kernel, so a sample's result would depend on the batch size;
                # padding to whole blocks keeps each row's arithmetic the same in any batch
                # (bitwise batch invariance: a solve alone, in a batch or in a shrinking
                # working set follows the same trajectory)
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                return F.linear(x, self.weight, self.bias)[:rows]
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(x.shape[0], x.shape[1], -1)                     # (B, C, L)
        # one batched GEMM with the weight broadcast (stride 0) and the bias fused in: it takes
        # strided inputs (a state's view of the solver's (B, k*C*L) buffer) without the copies
        # torch.matmul makes to fold (O, C) @ (B, C, L), and returns a contiguous (B, O, L)
        weight = self.weight.expand(x.shape[0], -1, -1)
        if self.bias is not None:
            out = torch.baddbmm(self.bias.view(1, -1, 1), weight, flat)
        else:
            out = torch.bmm(weight, flat)
        return out.reshape(x.shape[0], self.out_features, *x.shape[2:])


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) with a faster path for (B, C) inputs.

    On CPU, torch's group_norm kernel for a (B, C) tensor costs about three times a row-wise
    layer_norm of its (B, G, C/G) view (and its backward likewise); the two compute the same
    normalisation (equal in float64 to 1e-15), so (B, C) states take layer_norm plus the affine
    map. Inputs with spatial axes keep the native kernel, which is the faster one there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        rows, channels = x.shape
        y = F.layer_norm(x.reshape(rows, self.num_groups, channels // self.num_groups),
                         (channels // self.num_groups,), eps=self.eps).view(rows, channels)
        if not self.affine:
            return y
        return torch.addcmul(self.bias, y, self.weight)


class ModalityBlock(nn.Module):
    """f_theta_i(z_i; x_i) = GN(ReLU(GN(Lin(ReLU(GN(Lin(z_i)))) + x_i) [+ z_i]))  (paper Eq. 8).

    `residual=True` adds z_i before the last ReLU, as the authors' release does.
    `input_scale=True` (not in the paper) multiplies the result by the per-sample RMS of x_i: the
    last GroupNorm gives every sample's state the same size, which erases a per-sample scaling of
    the inputs (MM-Dynamics' confidence weighting); with it, z_i keeps its input's relative size.
    """

    def __init__(self, dim: int, num_groups: int, residual: bool = True, input_scale: bool = False):
        super().__init__()
        self.input_scale = input_scale
        self.lin1 = ChannelLinear(dim, dim)
        self.norm1 = GroupNorm(num_groups, dim)
        self.lin2 = ChannelLinear(dim, dim)
        self.norm2 = GroupNorm(num_groups, dim)
        self.norm3 = GroupNorm(num_groups, dim)
        self.residual = residual

    def forward(self, z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.relu(self.norm1(self.lin1(z)))
        if mask is not None:                      # variational dropout: one mask for the whole solve
            h = h * mask
        h = self.norm2(self.lin2(h) + x)
        if self.residual:
            h = h + z
        out = self.norm3(F.relu(h))
        if self.input_scale:
            out = out * x.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (x.dim() - 1)))
        return out


class FusionBlock(nn.Module):
    """f_fuse(z_fuse; z_1..z_N, x_fuse)  (paper Eqs. 9-12).

    Gate alpha_i = W_a(z_fuse + z_i) + b_a (one shared linear map, no sigmoid), purify
    z'_i = alpha_i * z_fuse, combine GN(ReLU(W_f sum_i z'_i + b_f + x_fuse)). Without the gate
    (Table 7 ablation) the modality states are combined directly: z'_i = z_i.
    """

    def __init__(self, dim: int, num_groups: int, gate: bool = True):
        super().__init__()
        self.gate = ChannelLinear(dim, dim) if gate else None
        self.fuse = ChannelLinear(dim, dim)
        self.norm = GroupNorm(num_groups, dim)

    def forward(self, z_fuse: torch.Tensor, z_modalities: List[torch.Tensor], x_fuse: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gate is not None:
            # sum_i W_a(z_fuse + z_i) + b_a == W_a(N z_fuse + sum_i z_i) + N b_a: one matmul, not N
            n = len(z_modalities)
            alpha_sum = self.gate(n * z_fuse + sum(z_modalities))
            if n > 1:
                alpha_sum = alpha_sum + (n - 1) * self.gate.bias.view(1, -1, *([1] * (z_fuse.dim() - 2)))
            total = alpha_sum * z_fuse
        else:
            total = sum(z_modalities)
        if mask is not None:
            total = total * mask
        return self.norm(F.relu(self.fuse(total) + x_fuse))
