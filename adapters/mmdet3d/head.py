"""``DEQFusionVoteHead``: mmdet3d's ``VoteHead`` with DEQ fusion of its seed features, registered in mmdet3d's MODELS.

Where it hooks in (mmdet3d 1.4.0, ``mmdet3d/models/dense_heads/vote_head.py``): ``VoteHead.forward``
reads its inputs through ``self._extract_input(feat_dict)``; for ImVoteNet's joint tower
``feat_dict['seed_features']`` is the inline ``torch.cat([seed_3d_features, img_features], dim=1)`` of
``ImVoteNet.loss()``/``predict()``.  The override calls ``super()._extract_input`` and replaces the
concatenated features by their DEQ fusion, so nothing of mmdet3d is copied or edited.

The loss trap: ``ImVoteNet.loss()`` combines the towers with ``for loss_term in losses_joint: if 'loss'
in loss_term: ... losses_towers[i][loss_term]`` over all three towers, so a ``loss_*`` key that only the
joint head returned would raise ``KeyError`` in the points-only and image-only towers.  Hence every tower
is a ``DEQFusionVoteHead`` (the config sets ``pts_bbox_heads.common.type``); only the joint one has
``deq_fusion``, the other two return ``loss_deq_jac = 0``.  The combined ``loss_deq_jac`` is then
``0.4 * jac_weight * jac`` (ImVoteNet's tower weights [0.4, 0.3, 0.3]), and mmengine's ``parse_losses``
adds it to the total like every ``loss*`` key.  The solver statistics go out as non-loss keys
(``deq_nstep``, ``deq_rel_residual``, ``deq_converged``), which ImVoteNet passes through from the joint
tower and mmengine logs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from mmdet3d.models.dense_heads import VoteHead
from mmdet3d.registry import MODELS

from ..common.settings import SettingsError
from .fusion import STRUCTURE_KEYS, SeedFeatureFusion, settings_from_config

JAC_KEY = "loss_deq_jac"


@MODELS.register_module()
class DEQFusionVoteHead(VoteHead):
    """A ``VoteHead`` that (with ``deq_fusion``) fuses the modality halves of its seed features by DEQ fusion."""

    def __init__(self, *args: Any, deq_fusion: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed_fusion: Optional[SeedFeatureFusion] = None
        self._jac_term: Optional[torch.Tensor] = None
        if deq_fusion is None:
            return
        cfg = dict(deq_fusion)
        missing = [k for k in STRUCTURE_KEYS if k not in cfg]
        if missing:
            raise SettingsError(f"deq_fusion needs {', '.join(missing)} (e.g. channels=(256, 256), out_channels=256)")
        fusion = SeedFeatureFusion(cfg["channels"], cfg["out_channels"], settings_from_config(cfg))
        vote_in = (kwargs.get("vote_module_cfg") or {}).get("in_channels")
        if vote_in is not None and int(vote_in) != fusion.out_channels:
            raise SettingsError(
                f"deq_fusion.out_channels={fusion.out_channels} but this head's vote_module_cfg.in_channels={vote_in}: "
                "set vote_module_cfg.in_channels (and conv_channels, vote_aggregation_cfg.mlp_channels[0]) to it")
        self.seed_fusion = fusion

    def _extract_input(self, feat_dict: dict) -> tuple:
        seed_points, seed_features, seed_indices = super()._extract_input(feat_dict)
        if self.seed_fusion is not None:
            seed_features, self._jac_term = self.seed_fusion(seed_features)
        return seed_points, seed_features, seed_indices

    def _with_fusion_terms(self, losses: Dict[str, Any]) -> Dict[str, Any]:
        like = next(v for v in losses.values() if torch.is_tensor(v))
        jac, self._jac_term = self._jac_term, None
        losses[JAC_KEY] = jac if jac is not None else like.new_zeros(())
        if self.seed_fusion is not None:
            losses.update(self.seed_fusion.log_values(like))
        return losses

    def loss(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        self._jac_term = None
        return self._with_fusion_terms(super().loss(*args, **kwargs))

    def loss_and_predict(self, *args: Any, **kwargs: Any):
        self._jac_term = None
        losses, results = super().loss_and_predict(*args, **kwargs)
        return self._with_fusion_terms(losses), results
