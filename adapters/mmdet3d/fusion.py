"""The joint tower's seed-feature fusion: ImVoteNet's concatenated halves in, DEQ-fused seed features out.

Torch and the core only (no mmdet3d), so the main environment tests it.  ``head.DEQFusionVoteHead``
builds one from the config's ``deq_fusion`` dict::

    deq_fusion=dict(channels=(256, 256),   # how ImVoteNet concatenated them: points | image votes
                    out_channels=256,      # what the joint VoteHead's vote module then reads
                    jac_weight=0.1, options=dict(f_max_iter=55))   # Settings fields (validated)

Fields of :class:`~deqfusion.adapters.mmdet3d.Settings` missing from the dict come from the one settings
mechanism (``Settings.configure(...)``, else ``DEQFUSION_MMDET3D_*``); the config's values win.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..common.settings import SettingsError
from . import Settings

STRUCTURE_KEYS = ("channels", "out_channels")


def settings_from_config(cfg: Mapping[str, Any], base: Optional[Settings] = None) -> Settings:
    """Settings = ``base`` (default: the current ones) with the config's Settings fields applied."""
    names = [f.name for f in dataclasses.fields(Settings)]
    extra = sorted(k for k in cfg if k not in names and k not in STRUCTURE_KEYS)
    if extra:
        raise SettingsError(f"deq_fusion: unknown key {extra[0]!r}; it takes {', '.join(STRUCTURE_KEYS)} and the "
                            f"settings {', '.join(names)}")
    chosen = {k: (dict(v) if k == "options" else v) for k, v in cfg.items() if k in names}
    return dataclasses.replace(base if base is not None else Settings.current(), **chosen)


class SeedFeatureFusion(nn.Module):
    """Split (B, sum(channels), N) seed features into their modalities and fuse them to (B, out_channels, N).

    DEQ fusion treats each seed as a position of the trailing axis (the core's (B, C, N) input), so the
    solver's statistics are per scene.  With ``fusion="concat"`` (the baseline) the features pass
    through unchanged and ``out_channels`` must be ``sum(channels)``.  ``last_stats`` / ``last_jac_loss``
    keep the latest solve (for logs and tests).
    """

    def __init__(self, channels: Sequence[int], out_channels: int, settings: Settings):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.out_channels = int(out_channels)
        self.settings = settings
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise SettingsError(f"deq_fusion.channels must list at least two positive widths, got {channels!r}")
        if "in_dims" in settings.options:
            raise SettingsError("deq_fusion: give the modality widths as channels=(...), not options.in_dims")
        self.deq = None
        if settings.is_deq:
            from deqfusion import DEQFusion

            in_dims = None if all(c == self.out_channels for c in self.channels) else self.channels
            self.deq = DEQFusion(dim=self.out_channels, num_modalities=len(self.channels), in_dims=in_dims,
                                 **settings.fusion_kwargs())
        elif self.out_channels != sum(self.channels):
            raise SettingsError(
                f"deq_fusion fusion='concat' passes the {sum(self.channels)} concatenated channels through, but "
                f"out_channels={self.out_channels}: set out_channels={sum(self.channels)} and the joint tower's "
                "widths back to mmdet3d's (or train with mmdet3d's own imvotenet_stage2 config, the baseline)")
        self.last_stats = None
        self.last_jac_loss: Optional[torch.Tensor] = None  # unweighted, of the latest training forward

    @property
    def in_channels(self) -> int:
        return sum(self.channels)

    def forward(self, seed_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fused (B, out_channels, N), the weighted Jacobian term: a scalar, zero for concat or in eval)."""
        if seed_features.dim() != 3 or seed_features.shape[1] != self.in_channels:
            raise ValueError(f"seed features must be (B, {self.in_channels}, N) = the concatenation of "
                             f"{' + '.join(map(str, self.channels))} channels, got {tuple(seed_features.shape)}; "
                             "fix deq_fusion.channels in the config")
        if self.deq is None:
            return seed_features, seed_features.new_zeros(())
        parts = list(torch.split(seed_features, list(self.channels), dim=1))
        out = self.deq(parts)
        self.last_stats = out.stats
        self.last_jac_loss = out.jac_loss.detach() if self.training else None
        return out.fused, self.settings.jac_weight * out.jac_loss

    def log_values(self, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Solver statistics of the latest solve as scalar tensors (mmengine logs non-``loss`` keys)."""
        stats = self.last_stats
        if stats is None or stats.nstep.numel() == 0:
            return {}
        return {  # device tensors, no host sync
            "deq_nstep": stats.nstep.float().mean().to(like),
            "deq_rel_residual": stats.rel_lowest.max().to(like),
            "deq_converged": stats.converged.float().mean().to(like),
        }

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out_channels={self.out_channels}, {self.settings.describe()}"
