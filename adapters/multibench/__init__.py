"""DEQ fusion for MultiBench (Liang et al., 2021): the late-fusion MM-IMDB example, the paper's Table 2.

MultiBench's ``training_structures/Supervised_Learning.train(encoders, fusion, head, ...)`` takes the
fusion module, the objective and the optimiser class as arguments, so the integration needs no edit
of the training structure.  ``patches/multibench/`` changes only the example script
``examples/multimedia/mmimdb_simple_late_fusion.py``::

    deq_adapter.install_import_standins()          # before `from datasets.imdb.get_data import ...`
    get_dataloader(deq_adapter.data_path("../video/multimodal_imdb.hdf5"), ..., no_robust=True)
    fusion = deq_adapter.build_fusion(Concat(), [512, 512]).cuda()
    head = Linear(deq_adapter.fused_width(fusion, 1024), 23).cuda()
    train(..., optimtype=deq_adapter.optimizer(fusion, torch.optim.AdamW), lr=deq_adapter.lr(8e-3),
          objective=deq_adapter.objective(torch.nn.BCEWithLogitsLoss()), objective_args_dict={})
    test(..., no_robust=True)

* **fusion**: :class:`~deqfusion.adapters.multibench.fusion.MultiBenchFusion` wraps DEQFusion over the
  two 512-d encoder outputs and returns a plain tuple ``(fused, jac_loss, stats)``: ``MMDL.forward``
  keeps the tuple in ``model.fuseout`` and feeds ``out[0]`` to the head (it tests ``type(out) is
  tuple``, which a NamedTuple would fail).  The head shrinks from 1024 (concatenation) to 512 inputs.
* **objective**: ``train`` calls a non-builtin objective as ``objective(pred, truth, args)`` with
  ``args['fused'] = model.fuseout``; :class:`DEQObjective` returns ``BCE + jac_weight * jac_loss``
  (weight 0.1, the paper's MM-IMDB value; the Jacobian term is zero in eval mode).
* **optimiser**: ``train`` builds one optimiser over a flat parameter list with one lr;
  :class:`FusionLROptimizer` splits it into two parameter groups, the fusion's at ``fusion_lr``
  (1e-4) and the rest at ``lr`` (1e-3), the paper's Appendix B.

With ``fusion="concat"`` every function returns the upstream's own object (``Concat()``,
``BCEWithLogitsLoss()``, ``torch.optim.AdamW``, lr 8e-3): the patched example is then the upstream
example, save the data path, ``no_robust=True`` and ``weights_only=False``.

Settings come through the one mechanism all adapters share (:mod:`deqfusion.adapters.common.settings`):
``configure(...)`` (the runner), else the environment, for a plain run of the patched example:

  ``DEQFUSION_MULTIBENCH_FUSION``     ``deq`` (default) or ``concat`` (the upstream's late fusion)
  ``DEQFUSION_MULTIBENCH_ABLATION``   a DEQFusion ablation row (``full``, ``no_gate``, ...; Table 8)
  ``DEQFUSION_MULTIBENCH_JAC_WEIGHT`` weight of the Jacobian loss (default 0.1)
  ``DEQFUSION_MULTIBENCH_LR``         lr of encoders and head (default: 1e-3 for DEQ, the example's 8e-3 for concat)
  ``DEQFUSION_MULTIBENCH_FUSION_LR``  lr of the fusion's parameters (default 1e-4)
  ``DEQFUSION_MULTIBENCH_OPTIONS``    DEQFusion options ``key=value,...`` (default f_max_iter=105, b_max_iter=106)
  ``DEQFUSION_MULTIBENCH_DATA``       path of multimodal_imdb.hdf5 (else the example's ../video/ path)
  ``DEQFUSION_MULTIBENCH_LOG_STATS``  print a solver-statistics line per train/eval phase (default on)

**Import stand-ins.** ``datasets/imdb/get_data.py`` imports ``gensim.models.KeyedVectors`` and
``.vgg.VGGClassifier`` at module level, and ``vgg.py`` imports ``theano`` and six ``blocks``
modules.  Theano (1.0.5, unmaintained since 2020) and Blocks (unmaintained since 2017, in none of
MultiBench's requirement files) do not install on a current Python; gensim would (4.x; the
environment.yml pins 3.8.3), but it serves the same path.  Only ``get_dataloader(..., no_robust=False)`` -- the
robustness test set, re-extracted from the raw posters and plots with VGG-16 and word2vec from
hard-coded ``/home/pliang/...`` paths -- ever calls them.  ``unimodals/common_models.py`` imports
``torchvision`` at module level for image encoders this example does not use (a torchvision build
must match torch's exactly, so it is optional here).  :func:`install_import_standins` puts stand-ins
for ``gensim``, ``theano``, ``blocks`` and ``torchvision`` at the end of ``sys.meta_path``
(:mod:`deqfusion.adapters.common.import_standins`): a really installed package is used as it is; a
stand-in lets the module import and raises ``StandInError``, naming the package and why, if called.

This module imports neither torch nor h5py at import time (``deqfusion --help`` stays fast); the
torch parts live in :mod:`.fusion` and are imported when a fusion, objective or optimiser is built.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

from ..common import import_standins
from ..common.settings import FusionSettings, SettingsError, parse_value

__all__ = [
    "Settings", "configure", "current_settings", "build_fusion", "fused_width", "objective", "optimizer", "lr",
    "data_path", "install_import_standins", "STANDINS", "PAPER_DEFAULTS", "PAPER_JAC_WEIGHT", "PAPER_LR",
    "PAPER_FUSION_LR", "MultiBenchFusion", "DEQObjective", "FusionLROptimizer", "parse_value",
]

# The paper's MM-IMDB settings (Appendix B; the authors' examples/multimedia/mmimdb_deq.py and their
# modified Supervised_Learning.py): DEQFusion(512, 2, f_thres=105, b_thres=106), loss += 0.1 * jac_loss,
# AdamW at lr 1e-3 with the fusion's parameters at lr 1e-4.
PAPER_DEFAULTS: Dict[str, Any] = {"f_max_iter": 105, "b_max_iter": 106}
PAPER_JAC_WEIGHT = 0.1
PAPER_LR = 1e-3
PAPER_FUSION_LR = 1e-4

# What datasets/imdb/get_data.py (and vgg.py) import at module level but the no_robust path never calls.
_ROBUST_ONLY = ("only MultiBench's robustness test path uses it (datasets/imdb/get_data.py get_dataloader(..., "
                "no_robust=False), which re-extracts features from the raw MM-IMDB posters and plots with VGG-16 "
                "and word2vec from hard-coded /home/pliang/... paths); the patched example passes no_robust=True. "
                "To run that path, install the real package")
STANDINS: Dict[str, str] = {
    "gensim": "datasets/imdb/get_data.py imports gensim.models.KeyedVectors at module level (word2vec); "
              + _ROBUST_ONLY + " (MultiBench's environment.yml has gensim 3.8.3; that path also needs theano and blocks)",
    "theano": "datasets/imdb/vgg.py imports theano at module level (Theano 1.0.5, unmaintained since 2020, does "
              "not install on current Python/numpy); " + _ROBUST_ONLY,
    "blocks": "datasets/imdb/vgg.py builds VGG-16 with Blocks bricks at module level (mila-iqia/blocks, in none "
              "of MultiBench's requirement files, unmaintained since 2017); " + _ROBUST_ONLY,
    # not dead, but optional here: its build must match torch's exactly, and only image encoders use it
    "torchvision": "unimodals/common_models.py imports torchvision at module level for its ResNet/VGG image "
                   "encoders; the MM-IMDB late-fusion path (MaxOut_MLP on VGG features, Linear) never calls it. "
                   "To use those encoders, install the torchvision build that matches your torch",
}


@dataclass(frozen=True)
class Settings(FusionSettings):
    """What the patched MultiBench example builds; ``options`` go to DEQFusion (names checked at once)."""

    upstream: ClassVar[str] = "multibench"
    baseline: ClassVar[str] = "concat"
    default_options: ClassVar[Mapping[str, Any]] = PAPER_DEFAULTS

    jac_weight: float = PAPER_JAC_WEIGHT
    lr: Optional[float] = None          # None: PAPER_LR for DEQ fusion, the example's own lr for concat
    fusion_lr: float = PAPER_FUSION_LR
    data: Optional[str] = None          # multimodal_imdb.hdf5; None: the example's own path
    log_stats: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lr", "fusion_lr"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise SettingsError(f"multibench {name} must be a number > 0, got {value!r}")

    def describe(self) -> str:
        if not self.is_deq:
            return "late fusion: concatenation (upstream MultiBench)" + (f", lr {self.lr:g}" if self.lr else "")
        kw = self.fusion_kwargs()
        kw.pop("ablation")
        opts = ", ".join(f"{k}={v}" for k, v in sorted(kw.items()))
        return (f"DEQ fusion [{self.ablation}], jac weight {self.jac_weight:g}, lr {self.lr or PAPER_LR:g} "
                f"(fusion {self.fusion_lr:g})" + (f", {opts}" if opts else ""))


configure = Settings.configure
current_settings = Settings.current
ENV_PREFIX = Settings.env_prefix()


def install_import_standins() -> Dict[str, str]:
    """Stand in gensim / theano / blocks where they are not installed (see the module docstring)."""
    import_standins.install(STANDINS)
    return {k: v for k, v in STANDINS.items() if import_standins.stood_in(k)}


def data_path(default: str, settings: Optional[Settings] = None) -> str:
    """The MM-IMDB file the example reads: the ``data`` setting, else the example's own path; checked
    (datasets, shapes, the release's 25,959 rows) so that a wrong file fails here with a clear error."""
    from . import data

    settings = settings or current_settings()
    path = data.locate(None, configured=settings.data) if settings.data else Path(default)
    data.check_file(path, require_upstream_layout=not data.own_splits_active())
    return str(path)


def build_fusion(baseline: Any, in_dims: Sequence[int], *, dim: Optional[int] = None,
                 settings: Optional[Settings] = None) -> Any:
    """The module the example passes to ``train`` as ``fusion``: ``baseline`` itself for concat, else
    a :class:`MultiBenchFusion` over inputs of widths ``in_dims`` with ``dim`` (default in_dims[0]) outputs."""
    settings = settings or current_settings()
    if not settings.is_deq:
        return baseline
    from .fusion import MultiBenchFusion

    return MultiBenchFusion(list(in_dims), settings, dim=dim)


def fused_width(fusion: Any, concat_width: int) -> int:
    """Input width of the head: the concatenated width for the baseline, the fusion's ``dim`` for DEQ."""
    return int(getattr(fusion, "dim", concat_width)) if _is_deq(fusion) else int(concat_width)


def objective(base: Any, settings: Optional[Settings] = None) -> Any:
    """``base`` (MultiBench's own BCEWithLogitsLoss) for concat, else ``base + jac_weight * jac_loss``."""
    settings = settings or current_settings()
    if not settings.is_deq:
        return base
    from .fusion import DEQObjective

    return DEQObjective(base, settings.jac_weight)


def optimizer(fusion: Any, optimtype: Any, settings: Optional[Settings] = None) -> Any:
    """``optimtype`` for concat, else a factory that gives the fusion's parameters their own lr."""
    settings = settings or current_settings()
    if not settings.is_deq or not _is_deq(fusion):
        return optimtype
    from .fusion import FusionLROptimizer

    return FusionLROptimizer(optimtype, fusion, settings.fusion_lr)


def lr(default: float, settings: Optional[Settings] = None) -> float:
    """lr of encoders and head: the ``lr`` setting, else PAPER_LR (1e-3) for DEQ, ``default`` for concat."""
    settings = settings or current_settings()
    if settings.lr is not None:
        return float(settings.lr)
    return PAPER_LR if settings.is_deq else float(default)


def _is_deq(fusion: Any) -> bool:
    mod = sys.modules.get(f"{__name__}.fusion")  # a MultiBenchFusion exists only once .fusion was imported
    return mod is not None and isinstance(fusion, mod.MultiBenchFusion)


_LAZY = {"MultiBenchFusion": "fusion", "DEQObjective": "fusion", "FusionLROptimizer": "fusion"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
