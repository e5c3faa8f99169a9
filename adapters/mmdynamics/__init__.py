"""DEQ fusion for MM-Dynamics (Han et al., CVPR 2022), the paper's BRCA baseline.

MM-Dynamics encodes each omics view to ``hidden`` features, scales them by the view's TCP
confidence, concatenates the views and classifies the ``views * hidden`` vector.  The patch in
``patches/mmdynamics/`` replaces the concatenation with this adapter's fusion module:

    self.fusion = deq_adapter.build_fusion(self.views, hidden_dim[0])            # __init__
    LinearLayer(deq_adapter.fused_width(self.fusion, self.views, hidden), C)    # classifier
    MMfeature, jac_term = deq_adapter.fuse(self.fusion, list_of_views)          # forward
    MMLoss = MMLoss + jac_term                                                  # loss

``train_test.py`` builds the model as ``MMDynamic(dim_list, hidden_dim, num_class, dropout=0.5)``,
so the settings cannot come through the constructor.  They come through the settings mechanism all
adapters share (:mod:`deqfusion.adapters.common.settings`): ``Settings.configure(...)`` (the
runner's context manager), else the environment (a plain ``python main.py`` on the patched clone):

   ``DEQFUSION_MMDYNAMICS_FUSION``      ``deq`` (default) or ``concat`` (the unchanged upstream model)
   ``DEQFUSION_MMDYNAMICS_ABLATION``    a row of the paper's Tables 6/7 (``full``, ``no_gate``, ...)
   ``DEQFUSION_MMDYNAMICS_JAC_WEIGHT``  weight of the Jacobian loss (default 20, the paper's BRCA value)
   ``DEQFUSION_MMDYNAMICS_OPTIONS``     other DEQFusion options, ``key=value,key=value``
                                        (e.g. ``f_max_iter=50,f_tol=1e-4``); unknown keys are an error.

With ``fusion="concat"`` no module is built and ``fuse`` is ``torch.cat`` with a zero loss term:
the patched model then has exactly the upstream's parameters, initialisation and outputs.

Defaults follow the paper's BRCA setting (Appendix B and the authors' ``main.py`` command):
Anderson forward solver, at most 105 steps (``--f_thres=105``), backward at most 106 steps,
Jacobian weight 20.  The DEQ fusion outputs ``hidden`` features, so the classifier shrinks from
``views * hidden`` to ``hidden`` inputs, as in the authors' release.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..common.settings import FusionSettings, parse_value

if TYPE_CHECKING:  # torch is imported only where a model is built or run (`deqfusion --help` stays fast)
    import torch
    from torch import nn

    from .fusion import MMDynamicsFusion

__all__ = [
    "Settings", "configure", "current_settings", "build_fusion", "fused_width", "fuse",
    "MMDynamicsFusion", "FUSIONS", "PAPER_DEFAULTS", "parse_value",
]

FUSIONS = ("deq", "concat")
# The paper's BRCA settings for the DEQFusion options (forward/backward step limits).
PAPER_DEFAULTS: Dict[str, Any] = {"f_max_iter": 105, "b_max_iter": 106}
PAPER_JAC_WEIGHT = 20.0


@dataclass(frozen=True)
class Settings(FusionSettings):
    """What the patched MMDynamic builds. ``options`` go to DEQFusion (names checked at once)."""

    upstream: ClassVar[str] = "mmdynamics"
    baseline: ClassVar[str] = "concat"
    default_options: ClassVar[Mapping[str, Any]] = PAPER_DEFAULTS

    jac_weight: float = PAPER_JAC_WEIGHT

    def describe(self) -> str:
        return "concatenation (upstream MM-Dynamics)" if not self.is_deq else super().describe()


configure = Settings.configure
current_settings = Settings.current
ENV_PREFIX = Settings.env_prefix()


def __getattr__(name: str) -> Any:
    if name == "MMDynamicsFusion":
        return importlib.import_module(".fusion", __name__).MMDynamicsFusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_fusion(num_views: int, hidden: int, settings: Optional[Settings] = None) -> Optional[MMDynamicsFusion]:
    """The module the patched ``MMDynamic.__init__`` stores as ``self.fusion`` (None = concatenation)."""
    settings = settings or current_settings()
    if not settings.is_deq:
        return None
    from .fusion import MMDynamicsFusion

    return MMDynamicsFusion(num_views, hidden, settings)


def fused_width(fusion: Optional[nn.Module], num_views: int, hidden: int) -> int:
    """Input width of MM-Dynamics' classifier: views*hidden for concatenation, hidden for DEQ fusion."""
    return num_views * hidden if fusion is None else hidden


def fuse(fusion: Optional[nn.Module], features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Union[torch.Tensor, float]]:
    """(fused features, loss term to add to MMLoss). Concatenation adds exactly 0.0."""
    if fusion is None:
        import torch

        return torch.cat(list(features), dim=1), 0.0
    return fusion(features)


def stats_summary(fusion: Optional[nn.Module]) -> Dict[str, Any]:
    """A JSON-able summary of the latest solve of a model's fusion (empty for concatenation)."""
    stats = getattr(fusion, "last_stats", None)
    if stats is None:
        return {}
    out: Dict[str, Any] = {
        "nstep_mean": float(stats.nstep.float().mean()),
        "nstep_max": int(stats.nstep.max()) if stats.nstep.numel() else 0,
        "abs_residual_max": float(stats.abs_lowest.max()) if stats.abs_lowest.numel() else 0.0,
        "rel_residual_max": float(stats.rel_lowest.max()) if stats.rel_lowest.numel() else 0.0,
    }
    out["f_evals"] = int(getattr(stats, "num_evals", 0))
    counts = getattr(stats, "counts", None)
    if callable(counts):
        out["status"] = counts()
    start = getattr(stats, "start", None)
    if start is not None and start.numel():
        out["start"] = {name: int((start == code).sum()) for code, name in enumerate(("cold", "warm", "rejected"))}
    if getattr(fusion, "last_jac_loss", None) is not None:
        out["jac_loss"] = fusion.last_jac_loss
    back = getattr(stats, "backward", None)  # the adjoint solve, once backward has run
    if back is not None and back.nstep.numel():
        out["backward"] = {"nstep_mean": float(back.nstep.float().mean()), "nstep_max": int(back.nstep.max()),
                           "rel_residual_max": float(back.rel_lowest.max()), "status": back.counts(),
                           "f_evals": int(back.num_evals)}
    return out


def model_fusion(model: nn.Module) -> Optional[nn.Module]:
    """The fusion module of a patched MMDynamic (None for concatenation or an unpatched model)."""
    return getattr(model, "fusion", None)

