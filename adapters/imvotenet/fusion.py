"""The module the patched ImVoteNet stores as ``self.fusion`` (imported only when DEQ fusion is built)."""
from __future__ import annotations

import torch  # noqa: F401  (the annotations below)
from torch import nn

from . import Settings, _live


class ImVoteNetFusion(nn.Module):
    """DEQFusion of the point-cloud and image-vote seed features, (B, C, 1024) each -> (B, dim, 1024).

    ``last_stats`` keeps the latest solve's statistics (the adjoint's appear in
    ``last_stats.backward`` once backward has run), for runners that report convergence.
    """

    def __init__(self, pc_dim: int, img_dim: int, settings: Settings):
        super().__init__()
        from deqfusion import DEQFusion  # here, so the concat baseline needs no core import

        self.settings = settings
        self.deq = DEQFusion(dim=int(pc_dim), num_modalities=2, in_dims=[int(pc_dim), int(img_dim)],
                             **settings.fusion_kwargs())
        self.last_stats = None
        _live.add(self)

    def forward(self, pc_features: torch.Tensor, img_features: torch.Tensor):
        out = self.deq([pc_features, img_features])
        self.last_stats = out.stats
        return out

    def extra_repr(self) -> str:
        return self.settings.describe()
