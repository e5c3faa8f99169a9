"""An independent reference for DEQ fusion's map: paper Eqs. 8-12 written out in plain torch ops.

It reads a DEQFusion's parameters by name (`named_parameters()`, or any {name: tensor} dict) and
calls none of its code -- not its blocks, not `_step`, not ChannelLinear -- so that a wrong term in
core/blocks.py or core/layer.py shows up as a difference (tests/test_layer_reference.py). Sources:
the paper (Ni et al. 2023, Eqs. 8-12), /work/shared/DESIGN.md "The core", README "What it
computes", and the authors' release DEQ_fusion.py (which adds `+ z_i` before the last ReLU of
f_theta: `residual=True`).

    f_theta_i(z_i; x_i) = GN3(ReLU(GN2(W2 ReLU(GN1(W1 z_i + b1)) + b2 + x_i) [+ z_i]))      Eq. 8
    alpha_i             = W_a (z_fuse + z_i) + b_a       (one shared gate, no sigmoid)     Eq. 9
    z'_i                = alpha_i * z_fuse                                                  Eq. 10
    f_fuse              = GN(ReLU(W_f sum_i z'_i + b_f + x_fuse))                           Eq. 11
    x_fuse              = sum_i w_i x_i + b                                                 Eq. 12

The fused branch reads this step's updated z_i (Gauss-Seidel, Eq. 9 uses z_i^[j+1]). Not in the
paper, optional in the core: `input_scale` multiplies f_theta_i's output by the per-sample RMS of
x_i (sqrt of the mean of x_i^2 over channels and positions). Linear maps act
on the channel axis (dim 1) of (B, C, *spatial) features; GroupNorm is per sample. Dropout is no
part of the paper's map: the core puts one fixed mask after the first ReLU of f_theta and one on
the purified sum sum_i z'_i (core/blocks.py), and the reference puts them at the same places.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

GN_EPS = 1e-5      # nn.GroupNorm's default, which the paper's release uses

# The rows of the paper's Tables 6/7, written out here (not imported from the core):
# name -> (modality blocks f_theta, fused block f_fuse, gate, how the fixed point is found)
ROWS = {
    "weighted_sum": (False, False, False, "none"),     # fused = x_fuse
    "no_deq": (True, True, True, "one pass"),          # f_theta + f_fuse applied once from zeros
    "modality_deq": (True, False, False, "solve"),     # f_theta only; fused = sum_i z_i*
    "fusion_deq": (False, True, True, "solve"),        # f_fuse only; z_i = x_i throughout
    "full": (True, True, True, "solve"),
    "no_gate": (True, True, False, "solve"),           # full with z'_i = z_i (no purification)
}
SOLVED_ROWS = [name for name, row in ROWS.items() if row[3] == "solve"]
MAP_ROWS = [name for name, row in ROWS.items() if row[3] != "none"]


def params(fusion) -> Dict[str, torch.Tensor]:
    """The parameters of a DEQFusion by name (detached), the only thing the reference takes from it."""
    return {name: p.detach() for name, p in fusion.named_parameters()}


def leaf_params(fusion) -> Dict[str, torch.Tensor]:
    """Copies of the parameters that require grad, for gradients through the reference."""
    return {name: p.detach().clone().requires_grad_() for name, p in fusion.named_parameters()}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W x + b on the channel axis of (B, C, *spatial)."""
    return F.linear(x.movedim(1, -1), weight, bias).movedim(-1, 1)


def group_norm(x: torch.Tensor, P: Dict[str, torch.Tensor], name: str, groups: int) -> torch.Tensor:
    return F.group_norm(x, groups, P[f"{name}.weight"], P[f"{name}.bias"], eps=GN_EPS)


class Reference:
    """The map of one ablation row, on states in the layer's order: z_1..z_N (if the row has
    f_theta), then z_fuse (if it has f_fuse)."""

    def __init__(self, P: Dict[str, torch.Tensor], *, ablation: str, num_modalities: int, num_groups: int = 4,
                 residual: bool = False, input_scale: bool = False):
        self.P, self.n, self.groups, self.residual, self.input_scale = P, num_modalities, num_groups, residual, input_scale
        self.blocks, self.fuse, self.gate, self.kind = ROWS[ablation]

    # inputs ---------------------------------------------------------------------------------
    def project(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """in_dims projections: a linear map to dim where the width differs, identity otherwise."""
        out = []
        for i, x in enumerate(xs):
            w = self.P.get(f"projections.{i}.weight")
            out.append(x if w is None else linear(x, w, self.P[f"projections.{i}.bias"]))
        return out

    def x_fuse(self, xs: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The fused branch's injection (also the weighted-sum row's output); None for rows
        without f_fuse (modality_deq), which have no such parameters."""
        if not self.fuse and self.kind != "none":
            return None
        w = self.P["modality_weights"]
        return sum(w[i] * x for i, x in enumerate(xs)) + self.P["fuse_bias"]                 # Eq. 12

    # the map ----------------------------------------------------------------------------------
    def f_theta(self, i: int, z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        P, g, pre = self.P, self.groups, f"modality_blocks.{i}"
        h = F.relu(group_norm(linear(z, P[f"{pre}.lin1.weight"], P[f"{pre}.lin1.bias"]), P, f"{pre}.norm1", g))
        if mask is not None:
            h = h * mask
        h = group_norm(linear(h, P[f"{pre}.lin2.weight"], P[f"{pre}.lin2.bias"]) + x, P, f"{pre}.norm2", g)
        if self.residual:
            h = h + z
        out = group_norm(F.relu(h), P, f"{pre}.norm3", g)                                     # Eq. 8
        if self.input_scale:
            rms = torch.sqrt(torch.mean(x.reshape(x.shape[0], -1) ** 2, dim=1))
            out = out * rms.reshape(-1, *([1] * (x.dim() - 1)))
        return out

    def f_fuse(self, z_fuse: torch.Tensor, zs: Sequence[torch.Tensor], x_fuse: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        P = self.P
        if self.gate:
            gates = [linear(z_fuse + z, P["fusion_block.gate.weight"], P["fusion_block.gate.bias"]) for z in zs]  # Eq. 9
            purified = [a * z_fuse for a in gates]                                                                # Eq. 10
        else:
            purified = list(zs)
        total = sum(purified)
        if mask is not None:
            total = total * mask
        out = linear(total, P["fusion_block.fuse.weight"], P["fusion_block.fuse.bias"]) + x_fuse
        return group_norm(F.relu(out), P, "fusion_block.norm", self.groups)                                       # Eq. 11

    def step(self, states: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], x_fuse: Optional[torch.Tensor],
             masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
        """One application of the joint map; xs are the projected inputs."""
        masks = masks if masks is not None else [None] * (self.n + 1)
        n = self.n
        if self.blocks:
            zs = [self.f_theta(i, states[i], xs[i], masks[i]) for i in range(n)]
        else:
            zs = list(xs)                                   # f_theta = identity: z_i = x_i
        if not self.fuse:
            return zs
        z_fuse = self.f_fuse(states[-1], zs, x_fuse, masks[n])      # reads the new z_i (Gauss-Seidel)
        return (zs if self.blocks else []) + [z_fuse]

    def fused(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        return states[-1] if self.fuse else sum(states)

    def num_states(self) -> int:
        return (self.n if self.blocks else 0) + (1 if self.fuse else 0)

    def zeros(self, like: torch.Tensor) -> List[torch.Tensor]:
        return [torch.zeros_like(like) for _ in range(self.num_states())]

    def run(self, xs_raw: Sequence[torch.Tensor], steps: int, masks=None):
        """`steps` plain applications from zeros on raw (unprojected) inputs; differentiable with
        respect to the inputs and to P. Returns (states, projected inputs, x_fuse)."""
        xs = self.project(xs_raw)
        xf = self.x_fuse(xs)
        states = self.zeros(xs[0]) if self.kind != "none" else []
        for _ in range(steps if self.kind != "none" else 0):
            states = self.step(states, xs, xf, masks)
        return states, xs, xf

    def iterate(self, xs_raw: Sequence[torch.Tensor], steps: int, masks=None) -> torch.Tensor:
        """The fused output after `steps` plain applications from zeros (x_fuse for weighted_sum)."""
        states, _, xf = self.run(xs_raw, steps, masks)
        return xf if self.kind == "none" else self.fused(states)

    def residual_of(self, states: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], x_fuse: Optional[torch.Tensor],
                    masks=None) -> torch.Tensor:
        """Per-sample relative residual ||F(z) - z|| / ||F(z)|| of the joint state."""
        new = self.step(states, xs, x_fuse, masks)
        diff = torch.cat([(a - b).flatten(1) for a, b in zip(new, states)], dim=1)
        img = torch.cat([a.flatten(1) for a in new], dim=1)
        return diff.norm(dim=1) / img.norm(dim=1)


def reference_for(fusion, P: Optional[Dict[str, torch.Tensor]] = None) -> Reference:
    """The reference for a DEQFusion's ablation row and block form (read from its config)."""
    cfg = fusion.config
    return Reference(params(fusion) if P is None else P, ablation=cfg.ablation, num_modalities=cfg.num_modalities,
                     num_groups=cfg.num_groups, residual=cfg.block_residual,
                     input_scale=getattr(cfg, "input_scale", False))


def dropout_masks(seed: int, like: torch.Tensor, count: int, p: float) -> List[torch.Tensor]:
    """The masks DEQFusion draws for a forward with torch.manual_seed(seed) just before it: it draws
    `count` = N + 1 Bernoulli(1 - p) masks of the projected features' shape, scaled by 1/(1 - p),
    from the global generator, before any other random draw of the forward (core/layer.py
    `_dropout_masks`). Reproducing the draw (rather than reading the layer's masks) keeps the
    reference independent; a changed draw makes the dropout tests fail, not pass."""
    torch.manual_seed(seed)
    keep = 1.0 - p
    return [torch.bernoulli(torch.full_like(like, keep)) / keep for _ in range(count)]
