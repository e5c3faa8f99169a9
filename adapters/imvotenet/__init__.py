"""DEQ fusion for ImVoteNet (Qi et al., CVPR 2020), the paper's SUN RGB-D baseline (Table 4).

ImVoteNet lifts 2D image votes to the 1024 point-cloud seeds and trains three towers: image only,
points only and joint.  The joint tower reads ``torch.cat((pc_features, img_features), 1)``: the
256-channel PointNet++ seed features and the 256-channel image-vote features (after
``image_mlp``), ``(B, 256, 1024)`` each.  The patch in ``patches/imvotenet/`` replaces that
concatenation with this adapter's fusion (``models/imvotenet.py`` only):

    from deqfusion.adapters import imvotenet as deq_adapter
    get_loss = deq_adapter.wrap_loss(get_loss)                  # train.py/eval.py take MODEL.get_loss
    VotingModule(self.vote_factor, deq_adapter.fused_width(256, image_hidden_dim))     # joint tower
    ProposalModule(..., seed_feat_dim=deq_adapter.fused_width(256, image_hidden_dim), ...)
    self.fusion = deq_adapter.build_fusion(256, image_hidden_dim)                       # last in __init__
    joint_features = deq_adapter.fuse(self.fusion, pc_features, img_features, end_points)   # forward

Design (see docs/imvotenet.md):

- The two modalities keep their seed axis: DEQFusion works on ``(B, 256, 1024)`` directly, one
  sample per scene, normalisation per scene; solver statistics are per scene.
- Width: the fused feature is 256 channels (``dim`` = the modality width, as in the paper's other
  benchmarks and the authors' releases), so the joint tower's two constructor widths become 256
  (``fused_width``).  With ``fusion="concat"`` they stay 512 and the model is the upstream's.
- The Jacobian term reaches the loss without touching ``train.py``: ``fuse`` stores the unweighted
  term in ``end_points['deq_jac_loss']`` (a tensor, so ``nn.DataParallel`` gathers it), and the
  ``get_loss`` that train.py and eval.py take from the model module is wrapped to add
  ``jac_weight * mean(deq_jac_loss)`` to the loss (and to ``end_points['loss']``).
- ``end_points`` also carries per-scene solver statistics (``deq_nstep``, ``deq_abs_residual``,
  ``deq_rel_residual``, ``deq_status``) and ``deq_converged_ratio``, which the upstream's own loops
  log with their other ``*ratio*`` / ``*loss*`` keys (and tensorboard); ``wrap_loss`` also logs one
  line per iteration through the ``deqfusion.adapters.imvotenet`` logger.

Settings (the shared mechanism, :mod:`deqfusion.adapters.common.settings`): ``configure(...)``, else
``DEQFUSION_IMVOTENET_FUSION`` (``deq`` | ``concat``), ``_ABLATION``, ``_JAC_WEIGHT`` (default 1.0,
see ``DEFAULT_JAC_WEIGHT``) and ``_OPTIONS`` (DEQFusion options, e.g. ``f_max_iter=30``).
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, MutableMapping, Optional

import torch
from torch import nn

from ..common.settings import FusionSettings, parse_value

__all__ = [
    "Settings", "configure", "current_settings", "build_fusion", "fused_width", "fuse", "wrap_loss",
    "ImVoteNetFusion", "DEFAULT_JAC_WEIGHT", "STAT_KEYS", "parse_value", "live_fusions",
]

log = logging.getLogger(__name__)

# Not given by the paper (no ImVoteNet code was released). ImVoteNet's get_loss multiplies every
# tower's loss by 10 (loss_helper.py), so 1.0 puts the term at the relative size the paper's
# MM-IMDB weight 0.1 has against a unit-scale loss. See docs/imvotenet.md.
DEFAULT_JAC_WEIGHT = 1.0
# The keys fuse() writes into ImVoteNet's end_points dict (tensors; per scene where shaped (B,)).
STAT_KEYS = ("deq_jac_loss", "deq_nstep", "deq_abs_residual", "deq_rel_residual", "deq_status")

# loss_helper.get_loss's per-tower totals (prefixes img_only_, pc_only_, pc_img_)
TOWER_LOSS_KEYS = ("img_only_loss", "pc_only_loss", "pc_img_loss")

_live: weakref.WeakSet[ImVoteNetFusion] = weakref.WeakSet()


@dataclass(frozen=True)
class Settings(FusionSettings):
    """What the patched ImVoteNet builds. ``options`` go to DEQFusion (names checked at once)."""

    upstream: ClassVar[str] = "imvotenet"
    baseline: ClassVar[str] = "concat"
    default_options: ClassVar[Mapping[str, Any]] = {}  # the core's (= the authors' release) 55/56 steps

    jac_weight: float = DEFAULT_JAC_WEIGHT

    def describe(self) -> str:
        return "concatenation (upstream ImVoteNet)" if not self.is_deq else super().describe()

    def fusion_kwargs(self) -> Dict[str, Any]:
        kw = super().fusion_kwargs()
        if self.jac_weight == 0 and "jac_reg" not in self.options:
            kw["jac_reg"] = False  # a term weighted 0 need not be estimated
        return kw


configure = Settings.configure
current_settings = Settings.current
ENV_PREFIX = Settings.env_prefix()


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


def live_fusions():
    """The ImVoteNetFusion modules alive in this process (for a runner's per-step report)."""
    return list(_live)


def fused_width(pc_dim: int, img_dim: int, settings: Optional[Settings] = None) -> int:
    """Input width of the joint tower: pc_dim + img_dim for concatenation, pc_dim for DEQ fusion."""
    settings = settings or current_settings()
    return int(pc_dim) if settings.is_deq else int(pc_dim) + int(img_dim)


def build_fusion(pc_dim: int, img_dim: int, settings: Optional[Settings] = None) -> Optional[ImVoteNetFusion]:
    """The module the patched ``ImVoteNet.__init__`` stores as ``self.fusion`` (None = concatenation)."""
    settings = settings or current_settings()
    if not settings.is_deq:
        return None
    return ImVoteNetFusion(pc_dim, img_dim, settings)


def fuse(fusion: Optional[nn.Module], pc_features: torch.Tensor, img_features: torch.Tensor,
         end_points: MutableMapping[str, Any]) -> torch.Tensor:
    """The joint tower's input. Concatenation for ``None``; else DEQ fusion, whose unweighted
    Jacobian term and per-scene solver statistics go into ``end_points`` for ``wrap_loss``."""
    if fusion is None:
        return torch.cat((pc_features, img_features), 1)
    out = fusion(pc_features, img_features)
    s = out.stats
    end_points["deq_jac_loss"] = out.jac_loss.reshape(())
    end_points["deq_nstep"] = s.nstep.detach()
    end_points["deq_abs_residual"] = s.abs_lowest.detach()
    end_points["deq_rel_residual"] = s.rel_lowest.detach()
    end_points["deq_status"] = s.status.detach()
    return out.fused


def wrap_loss(get_loss: Callable, settings: Optional[Settings] = None) -> Callable:
    """ImVoteNet's ``get_loss`` plus ``jac_weight * deq_jac_loss`` (a no-op for concatenation).

    The weight is read when the loss is called, from ``settings`` or the settings in force. The
    Jacobian value is averaged first: under ``nn.DataParallel`` it arrives as one value per replica.
    """

    def get_loss_with_deq(end_points, *args, **kwargs):
        loss, end_points = get_loss(end_points, *args, **kwargs)
        if "deq_jac_loss" not in end_points:
            _log_loss(loss, end_points)
            return loss, end_points
        weight = float((settings or current_settings()).jac_weight)
        jac = end_points["deq_jac_loss"].float().mean()
        if weight:
            loss = loss + weight * jac
            end_points["loss"] = loss
        end_points["deq_jac_loss"] = jac.detach()
        from deqfusion.solvers import Status

        end_points["deq_converged_ratio"] = (end_points["deq_status"] == int(Status.CONVERGED)).float().mean()
        if log.isEnabledFor(logging.INFO):
            log.info("deq forward %s", json.dumps(dict(step_record(end_points), training=bool(loss.requires_grad))))
        _log_loss(loss, end_points)
        return loss, end_points

    get_loss_with_deq.__wrapped__ = get_loss  # type: ignore[attr-defined]
    return get_loss_with_deq


def _log_loss(loss: torch.Tensor, end_points: Mapping[str, Any]) -> None:
    """One 'deq loss' record per call: the total and the towers' losses (training: the loss has a graph)."""
    if not log.isEnabledFor(logging.INFO):
        return
    towers = {k: float(end_points[k]) for k in TOWER_LOSS_KEYS if k in end_points}
    log.info("deq loss %s", json.dumps({"loss": float(loss.detach()), "training": bool(loss.requires_grad), "towers": towers}))


def step_record(end_points: Mapping[str, Any]) -> Dict[str, Any]:
    """A JSON-able per-scene summary of the latest solve found in ``end_points``."""
    from deqfusion.solvers import Status

    return {
        "nstep": end_points["deq_nstep"].tolist(),
        "abs_residual": [float(f"{v:.4g}") for v in end_points["deq_abs_residual"].tolist()],
        "rel_residual": [float(f"{v:.4g}") for v in end_points["deq_rel_residual"].tolist()],
        "status": [Status(int(s)).name.lower() for s in end_points["deq_status"].tolist()],
        "jac_loss": float(end_points["deq_jac_loss"]),
    }
