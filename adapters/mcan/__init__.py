"""DEQ fusion for MCAN (Yu et al., CVPR 2019), the paper's VQA-v2 baseline of Table 5.

MCAN reduces the co-attended question and image features to one vector each (``AttFlat``, (B, 2048)
each for ``--MODEL='large'``), *adds* them, layer-normalises the sum and classifies it into 3129
answers.  The patch in ``patches/mcan/`` replaces the sum with this adapter's fusion and adds the
Jacobian term where MCAN forms its loss:

    self.fusion = deq_adapter.build_fusion(__C)                        # core/model/net.py, Net.__init__
    proj_feat = deq_adapter.fuse(self.fusion, lang_feat, img_feat)     # Net.forward, was lang_feat + img_feat
    loss = loss_fn(pred, sub_ans_iter) + deq_adapter.jac_term(net)     # core/exec.py, Execution.train

``proj_norm`` (MCAN's LayerNorm) still follows the fusion, as in the upstream.  The fusion is built
after every upstream layer, so for one seed the DEQ model's upstream layers start from the same
weights as the baseline's.

Why the loss line is patched: MCAN's loop forms the loss from the network's output alone
(``BCELoss(reduction='sum')(pred, target)``), so nothing the network returns can carry the Jacobian
term into it without an autograd trick that would hide the term from the printed loss.  The network
therefore returns its output unchanged and stashes the weighted term; ``jac_term(net)`` takes it
(and clears it) where the loss is formed.  Under ``nn.DataParallel`` every replica stashes its own
term into the same dict (replicas share the module's ``__dict__`` entries), keyed by device.

The weight is per sample.  MCAN's BCE is *summed* over the sub-batch (and over the 3129 answers),
while the core's ``jac_loss`` is a batch mean (a Hutchinson estimate of ||J||_F^2 per state element,
averaged over the samples).  The term added is ``jac_weight * B * jac_loss``, which equals
``sum_b jac_weight * J_b``: every sample carries ``jac_weight`` times its own Jacobian estimate,
as it carries its own BCE sum, whatever the batch size or ``--ACCU``.  No paper value exists for
VQA-v2; the default 0.1 is the paper's MM-IMDB weight (its other multi-label BCE benchmark).
With ``jac_weight=0`` the estimate is not computed at all (``jac_reg=False``).

Outside training the Jacobian work is skipped: MCAN's evaluation calls ``net.eval()`` (it runs the
network without ``torch.no_grad()``), and the core computes no estimate in eval mode; the fusion
stashes nothing in eval mode either.

Settings come through the one settings mechanism (:mod:`deqfusion.adapters.common.settings`):
``Settings.configure(...)`` (the runner), else the environment (a plain ``python3 run.py`` on the
patched clone):

   ``DEQFUSION_MCAN_FUSION``      ``deq`` (default) or ``sum`` (the unchanged upstream model)
   ``DEQFUSION_MCAN_ABLATION``    a row of the paper's Tables 6/7 (``full``, ``no_gate``, ...)
   ``DEQFUSION_MCAN_JAC_WEIGHT``  per-sample weight of the Jacobian term (default 0.1)
   ``DEQFUSION_MCAN_LOG_EVERY``   a solver-statistics line every N forwards per mode (0 = none; default 500)
   ``DEQFUSION_MCAN_OPTIONS``     other DEQFusion options, ``key=value,key=value``

With ``fusion=sum`` nothing is built and ``fuse`` is ``lang_feat + img_feat``: the patched model is
the upstream's (same parameters, initialisation and outputs; tested).  DEQFusion options default to
the core's (the authors' generic defaults: Anderson, at most 55 forward / 56 adjoint steps).

This module imports no torch at import time (``deqfusion reproduce --help`` stays fast); the
``nn.Module`` lives in :mod:`.fusion`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional

from ..common.settings import FusionSettings, SettingsError, parse_value

__all__ = [
    "Settings", "configure", "current_settings", "build_fusion", "fuse", "jac_term", "model_fusion",
    "observe", "DEFAULT_JAC_WEIGHT", "parse_value",
]

DEFAULT_JAC_WEIGHT = 0.1
DEFAULT_LOG_EVERY = 500


@dataclass(frozen=True)
class Settings(FusionSettings):
    """What the patched MCAN builds. ``options`` go to DEQFusion (names checked at once)."""

    upstream: ClassVar[str] = "mcan"
    baseline: ClassVar[str] = "sum"
    default_options: ClassVar[Mapping[str, Any]] = {}

    jac_weight: float = DEFAULT_JAC_WEIGHT
    log_every: int = DEFAULT_LOG_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.log_every, int) or isinstance(self.log_every, bool) or self.log_every < 0:
            raise SettingsError(f"log_every must be an integer >= 0 (0 = no statistics lines), got {self.log_every!r}")

    def describe(self) -> str:
        return "sum (upstream MCAN)" if not self.is_deq else super().describe()


configure = Settings.configure
current_settings = Settings.current
_observers: List[List[Any]] = []


def _log_file(cfg: Any) -> Optional[str]:
    """MCAN's own log file for this run (``results/log/log_run_<VERSION>.txt``), if the config names one."""
    path, version = getattr(cfg, "LOG_PATH", None), getattr(cfg, "VERSION", None)
    return f"{path}log_run_{version}.txt" if path and version else None


def build_fusion(cfg: Any, settings: Optional[Settings] = None):
    """The module the patched ``Net.__init__`` stores as ``self.fusion`` (None = MCAN's sum).

    ``cfg`` is MCAN's ``__C``: the width is ``FLAT_OUT_SIZE`` (2048 for large), statistics lines go
    to MCAN's log file of the run.
    """
    settings = settings or current_settings()
    if not settings.is_deq:
        return None
    from .fusion import MCANFusion

    module = MCANFusion(int(cfg.FLAT_OUT_SIZE), settings, log_file=_log_file(cfg))
    for sink in _observers:
        sink.append(module)
    return module


def fuse(fusion: Any, lang_feat: Any, img_feat: Any) -> Any:
    """The fused (B, FLAT_OUT_SIZE) features: MCAN's ``lang_feat + img_feat``, or DEQ fusion of the two."""
    if fusion is None:
        return lang_feat + img_feat
    return fusion(lang_feat, img_feat)


def model_fusion(net: Any) -> Any:
    """The fusion module of a patched MCAN ``Net`` (through ``nn.DataParallel``); None for the sum."""
    return getattr(getattr(net, "module", net), "fusion", None)


def jac_term(net: Any) -> Any:
    """The weighted Jacobian term of the latest training forward(s), taken once; 0 for the sum baseline."""
    fusion = model_fusion(net)
    if fusion is None:
        return 0
    return fusion.pop_jac_term()


@contextlib.contextmanager
def observe() -> Iterator[List[Any]]:
    """Collect every fusion module built inside the block (the runner reads their statistics)."""
    sink: List[Any] = []
    _observers.append(sink)
    try:
        yield sink
    finally:
        _observers.remove(sink)


def summary_fields() -> Dict[str, str]:
    """What each key of a fusion statistics summary means (for reports)."""
    return {
        "forwards": "fusion forwards", "samples": "samples solved", "nstep_mean": "forward solver steps, mean",
        "nstep_max": "forward solver steps, max", "rel_residual_max": "worst relative residual",
        "status": "samples per solver status", "jac_loss_mean": "unweighted Jacobian estimate, mean over forwards",
        "backward_nstep_mean": "adjoint solver steps, mean",
    }
