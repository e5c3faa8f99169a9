"""The module the patched MMDynamic stores as ``self.fusion`` (imported only when DEQ fusion is built)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import Settings


class MMDynamicsFusion(nn.Module):
    """DEQFusion over MM-Dynamics' confidence-weighted view features, returning the weighted Jacobian term.

    ``last_stats`` holds the solver statistics of the latest forward (detached), so that a runner
    can report convergence without touching the upstream loop.
    """

    def __init__(self, num_views: int, hidden: int, settings: Settings):
        super().__init__()
        from deqfusion import DEQFusion  # imported here so the concat baseline needs no core

        self.settings = settings
        self.jac_weight = float(settings.jac_weight)
        self.deq = DEQFusion(dim=int(hidden), num_modalities=int(num_views), **settings.fusion_kwargs())
        self.last_stats = None
        self.last_jac_loss: Optional[float] = None

    # MM-Dynamics trains and evaluates full-batch, rows always in the same order (train_test.py at
    # the pin: train_epoch / test_epoch take whole data lists), so a row's index is its sample id:
    # with the `warm_start` option every epoch's solve starts from that sample's last fixed point.
    EVAL_IDS = 1 << 40   # evaluation rows are other samples than training rows

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = None
        if self.deq.warm_store is not None:
            ids = torch.arange(features[0].shape[0]) + (0 if self.training else self.EVAL_IDS)
        out = self.deq(list(features), sample_ids=ids)
        self.last_stats = out.stats
        self.last_jac_loss = float(out.jac_loss.detach()) if self.training else None
        return out.fused, self.jac_weight * out.jac_loss

    def extra_repr(self) -> str:
        return self.settings.describe()
