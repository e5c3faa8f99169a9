"""The nn.Module the patched CM-BERT holds as ``BertFinetun.fusion`` (see the package docstring)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deqfusion import DEQFusion

from . import Settings

INIT_FN_NAME = "init_bert_weights"  # CM-BERT's BertPreTrainedModel initialiser, applied with Module.apply


class CMBertFusion(nn.Module):
    """DEQFusion of CM-BERT's text and audio attention maps, (B, L, L) each, rows as channels.

    The forward returns the fused (B, L, L) map; the weighted Jacobian term of a training forward
    waits in ``pending_loss`` until :func:`loss_term` takes it.  ``last_stats`` / ``last_jac_loss``
    describe the latest solve (for the runner's log; nothing in the upstream reads them).
    """

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.seq_len = int(settings.seq_len)
        self.jac_weight = float(settings.jac_weight)
        self.deq = DEQFusion(dim=self.seq_len, num_modalities=2, **settings.fusion_kwargs())
        self.pending_loss: Optional[torch.Tensor] = None
        self.last_stats = None
        self.last_jac_loss: Optional[float] = None

    def forward(self, text_att: torch.Tensor, audio_att: torch.Tensor) -> torch.Tensor:
        for name, att in (("text", text_att), ("audio", audio_att)):
            if att.dim() != 3 or att.shape[1] != self.seq_len or att.shape[2] != self.seq_len:
                raise ValueError(
                    f"CM-BERT's {name} attention map has shape {tuple(att.shape)}, but the DEQ fusion was built for "
                    f"(B, {self.seq_len}, {self.seq_len}); run_classifier's --max_seq_length must equal the adapter's "
                    f"seq_len (set DEQFUSION_CMBERT_SEQ_LEN={att.shape[-1]}, or seq_len in configure())")
        out = self.deq([text_att, audio_att])
        self.last_stats = out.stats
        if self.training:
            self.last_jac_loss = float(out.jac_loss.detach())
            self.pending_loss = self.jac_weight * out.jac_loss
        else:
            self.last_jac_loss = None
            self.pending_loss = None
        return out.fused

    def apply(self, fn):  # type: ignore[override]
        """Module.apply, except CM-BERT's ``init_bert_weights``: the fusion keeps the core's initialisation."""
        if getattr(fn, "__name__", "") == INIT_FN_NAME:
            return self
        return super().apply(fn)

    def extra_repr(self) -> str:
        return self.settings.describe()
