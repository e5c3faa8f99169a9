"""DEQ fusion for CM-BERT (Yang et al., ACM MM 2020), the paper's CMU-MOSI baseline (Table 3).

CM-BERT's ``BertFinetun`` turns the last BERT layer and the word-aligned audio into two (B, L, L)
attention maps (L = ``max_seq_length`` = 50) and fuses them by simple addition,
``text_weight_1*text_att1 + audio_weight_1*audio_att + bias`` (model.py:448 at the pin).  The patch
in ``patches/cmbert/`` adds four lines and changes none:

    from deqfusion.adapters import cmbert as deq_adapter                              # imports
    self.fusion = deq_adapter.build_fusion()                                          # BertFinetun.__init__
    fusion_att = deq_adapter.fuse(self.fusion, text_att1, audio_att, fusion_att)      # after the sum
    loss = loss + deq_adapter.loss_term(self.BertFinetun.fusion)                      # after the loss

* The fusion is an attribute of ``BertFinetun``, so its parameters are named
  ``BertFinetun.fusion.*``: ``run_classifier.py`` unfreezes every name containing ``BertFinetun`` and
  puts names containing ``BertFine`` into its lr-0.01 group (names containing ``bias`` go, as the
  upstream's own ``BertFinetun.bias`` does, to the lr-2e-5 no-decay group).
* The two maps are two modalities, channel-first: a map's rows are its channels (``dim = L``) and its
  columns the spatial axis, as in the authors' release.  The fused map replaces the sum; with
  ``fusion="sum"`` nothing is built and ``fuse`` returns the upstream's sum untouched, so the
  patched model is exactly the upstream one.
* ``BertFinetun.forward`` still returns three values (``run_classifier.py`` unpacks three).  The
  weighted Jacobian term (``0.01 * jac_loss``, paper Appendix B) is kept on the fusion module by the
  forward and added inside ``BertForSequenceClassification.forward``'s per-sample loss, so the
  loop's ``loss.mean()`` carries it.
* CM-BERT initialises its model with ``self.apply(self.init_bert_weights)``, which would redraw
  every ``nn.Linear`` (the core's channel maps are ``nn.Linear``) from N(0, 0.02).  The fusion keeps
  the core's own initialisation instead, as the authors' Conv1d layers kept PyTorch's.

Settings come through the mechanism every adapter shares (:mod:`deqfusion.adapters.common.settings`):
``Settings.configure(...)`` (the runner), else ``DEQFUSION_CMBERT_*`` variables (a plain
``python run_classifier.py`` on the patched clone):

   ``DEQFUSION_CMBERT_FUSION``      ``deq`` (default) or ``sum`` (the unchanged upstream model)
   ``DEQFUSION_CMBERT_ABLATION``    a row of the paper's ablation tables (``full``, ``no_gate``, ...)
   ``DEQFUSION_CMBERT_JAC_WEIGHT``  weight of the Jacobian loss (default 0.01, the paper's CMU-MOSI value)
   ``DEQFUSION_CMBERT_SEQ_LEN``     L, the attention maps' size: run_classifier's ``--max_seq_length`` (50)
   ``DEQFUSION_CMBERT_OPTIONS``     other DEQFusion options, ``key=value,key=value``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Mapping, Optional, Union

from ..common.settings import FusionSettings, SettingsError, parse_value

if TYPE_CHECKING:  # torch is imported where the fusion is built, so `deqfusion --help` stays fast
    import torch
    from torch import nn

    from .fusion import CMBertFusion

__all__ = [
    "Settings", "configure", "current_settings", "build_fusion", "fuse", "loss_term", "CMBertFusion",
    "stats_summary", "model_fusion", "PAPER_DEFAULTS", "PAPER_JAC_WEIGHT", "UPSTREAM_SEQ_LEN", "parse_value",
]

UPSTREAM_SEQ_LEN = 50  # run_classifier.py's --max_seq_length default at the pin
# The authors' CMU-MOSI settings (experiments/CMU-MOSI/model.py: f_thres 105, b_thres 106); one group
# in GroupNorm, as their fused branch's GroupNorm(1, 50): the 50 rows of a map are token positions,
# and splitting them into groups would normalise each block of positions on its own.
PAPER_DEFAULTS: Dict[str, Any] = {"f_max_iter": 105, "b_max_iter": 106, "num_groups": 1}
PAPER_JAC_WEIGHT = 0.01


@dataclass(frozen=True)
class Settings(FusionSettings):
    """What the patched ``BertFinetun`` builds. ``options`` go to DEQFusion (names checked at once)."""

    upstream: ClassVar[str] = "cmbert"
    baseline: ClassVar[str] = "sum"
    default_options: ClassVar[Mapping[str, Any]] = PAPER_DEFAULTS

    jac_weight: float = PAPER_JAC_WEIGHT
    seq_len: int = UPSTREAM_SEQ_LEN

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise SettingsError(f"seq_len must be run_classifier's --max_seq_length (an int >= 2), got {self.seq_len!r}")

    def describe(self) -> str:
        return "simple addition (upstream CM-BERT)" if not self.is_deq else super().describe()


configure = Settings.configure
current_settings = Settings.current


def build_fusion(settings: Optional[Settings] = None) -> Optional[CMBertFusion]:
    """The module the patched ``BertFinetun.__init__`` stores as ``self.fusion`` (None = simple addition)."""
    settings = settings or current_settings()
    if not settings.is_deq:
        return None
    from .fusion import CMBertFusion

    return CMBertFusion(settings)


def __getattr__(name: str) -> Any:
    if name == "CMBertFusion":  # the nn.Module, imported on first use (it needs torch)
        from .fusion import CMBertFusion

        return CMBertFusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse(fusion: Optional[nn.Module], text_att: torch.Tensor, audio_att: torch.Tensor,
         summed: torch.Tensor) -> torch.Tensor:
    """The fused attention map: the upstream's sum (``summed``, unchanged) or the DEQ fusion of the two maps."""
    if fusion is None:
        return summed
    return fusion(text_att, audio_att)


def loss_term(fusion: Optional[nn.Module]) -> Union[torch.Tensor, float]:
    """What the patched loss line adds: the weighted Jacobian term of the latest training forward
    (taken once), else exactly 0.0 (simple addition, evaluation)."""
    pending = getattr(fusion, "pending_loss", None)
    if pending is None:
        return 0.0
    fusion.pending_loss = None
    return pending


def model_fusion(model: nn.Module) -> Optional[nn.Module]:
    """The fusion module of a patched CM-BERT model (also through a DataParallel ``.module``); None for the sum."""
    inner = getattr(model, "module", model)
    finetun = getattr(inner, "BertFinetun", None)
    return getattr(finetun, "fusion", None)


def stats_summary(fusion: Optional[nn.Module]) -> Dict[str, Any]:
    """A JSON-able summary of the latest solve of the fusion (empty for the sum)."""
    stats = getattr(fusion, "last_stats", None)
    if stats is None:
        return {}
    out: Dict[str, Any] = {
        "samples": int(stats.nstep.numel()),
        "nstep_mean": float(stats.nstep.float().mean()) if stats.nstep.numel() else 0.0,
        "nstep_max": int(stats.nstep.max()) if stats.nstep.numel() else 0,
        "abs_residual_max": float(stats.abs_lowest.max()) if stats.abs_lowest.numel() else 0.0,
        "rel_residual_max": float(stats.rel_lowest.max()) if stats.rel_lowest.numel() else 0.0,
        "status": stats.counts(),
    }
    if getattr(fusion, "last_jac_loss", None) is not None:
        out["jac_loss"] = fusion.last_jac_loss
    back = getattr(stats, "backward", None)
    if back is not None and back.nstep.numel():
        out["backward"] = {"nstep_mean": float(back.nstep.float().mean()), "nstep_max": int(back.nstep.max()),
                           "rel_residual_max": float(back.rel_lowest.max()), "status": back.counts()}
    return out
