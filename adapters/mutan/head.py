"""What replaces block's answer fusion: ``DEQClassifier([q, v]) -> logits``, like the Mutan it replaces."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from . import Settings

__all__ = ["DEQClassifier"]


class DEQClassifier(nn.Module):
    """DEQFusion (``in_dims`` = the replaced fusion's ``input_dims``, projected to ``settings.dim``) and a
    linear layer to the ``output_dim`` answers.

    The per-sample Jacobian term and solver statistics of the latest forward wait in
    :meth:`pop_outputs` for the network's forward hook (:mod:`deqfusion.adapters.mutan.network`), as
    (B, 1) tensors (see ``SAMPLE_KEYS``).  ``n_params`` is there because block logs it for every fusion.
    """

    def __init__(self, input_dims: Sequence[int], output_dim: int, settings: Settings):
        super().__init__()
        from deqfusion import DEQFusion

        self.settings = settings
        self.input_dims = [int(d) for d in input_dims]
        self.output_dim = int(output_dim)
        self.deq = DEQFusion(dim=settings.dim, num_modalities=len(self.input_dims), in_dims=self.input_dims,
                             **settings.fusion_kwargs())
        self.linear_out = nn.Linear(settings.dim, self.output_dim)
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self._outputs: Optional[Dict[str, torch.Tensor]] = None
        self.last_stats = None

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.deq(list(x))
        self.last_stats = out.stats
        batch = out.fused.shape[0]

        def column(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=out.fused.device, dtype=torch.float32).reshape(batch, 1)

        self._outputs = {
            "deq_sample_jac_loss": out.jac_loss.reshape(1, 1).expand(batch, 1),
            "deq_sample_nstep": column(out.stats.nstep),
            "deq_sample_rel_residual": column(out.stats.rel_lowest),
            "deq_sample_converged": column(out.stats.converged),
        }
        return self.linear_out(out.fused)

    def pop_outputs(self) -> Dict[str, torch.Tensor]:
        """The latest forward's per-sample outputs (empty if none since the last pop)."""
        outputs, self._outputs = self._outputs or {}, None
        return outputs

    def extra_repr(self) -> str:
        return f"in {self.input_dims} -> dim {self.settings.dim} -> {self.output_dim} answers; {self.settings.describe()}"
