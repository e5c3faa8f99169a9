"""``model.criterion.import: deqfusion.adapters.mutan.criterion``: block's criterion plus the Jacobian term.

bootstrap calls ``factory(engine, mode)`` for each split.  block's own criterion factory makes the
criterion of ``model.criterion.name`` (``vqa_cross_entropy``; ``None`` on the test split, which has no
answers).  For DEQ fusion it is wrapped by :class:`JacobianLoss`:

    loss = block's loss + jac_weight * mean(deq_sample_jac_loss)

``jac_loss`` is DEQFusion's unweighted Hutchinson estimate (zero in evaluation, where bootstrap runs
under ``no_grad`` and DEQFusion skips the Jacobian work).  block's cross-entropy is a mean over the
batch, so the weight does not scale with the batch size.  The wrapper also turns the network's
per-sample solver statistics into the scalars bootstrap logs (``STAT_KEYS``).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from . import current_settings

__all__ = ["factory", "JacobianLoss"]


class JacobianLoss(nn.Module):
    """``criterion(net_out, batch)`` plus ``jac_weight x`` the network's Jacobian term, and solver statistics."""

    def __init__(self, criterion: nn.Module, jac_weight: float):
        super().__init__()
        self.criterion = criterion
        self.jac_weight = float(jac_weight)

    def forward(self, net_out: Dict[str, Any], batch: Dict[str, Any]) -> Dict[str, Any]:
        out = self.criterion(net_out, batch)
        jac = net_out.get("deq_sample_jac_loss")
        if jac is None:  # the network has no DEQ fusion
            return out
        jac = jac.float().mean()
        out["loss_vqa"] = out["loss"].detach()
        out["loss"] = out["loss"] + self.jac_weight * jac
        out["jac_loss"] = jac.detach()
        with torch.no_grad():
            out["deq_nstep"] = net_out["deq_sample_nstep"].mean()
            out["deq_rel_residual_max"] = net_out["deq_sample_rel_residual"].max()
            out["deq_converged"] = net_out["deq_sample_converged"].mean()
        return out

    def extra_repr(self) -> str:
        return f"jac_weight={self.jac_weight:g}"


def factory(engine=None, mode=None):
    from block.models.criterions import factory as block_criterions

    criterion = block_criterions.factory(engine, mode)
    settings = current_settings()
    if criterion is None or not settings.is_deq:
        return criterion
    return JacobianLoss(criterion, settings.jac_weight)
