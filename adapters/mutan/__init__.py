"""DEQ fusion for Mutan on VQA-v2 (block.bootstrap.pytorch), the paper's Table 5, as a bootstrap plugin.

block.bootstrap.pytorch builds its model from bootstrap options, and bootstrap imports the modules
that ``model.network.import`` and ``model.criterion.import`` name.  So nothing in the upstream is
patched: the project's options file ``options/mutan_deq.yaml`` names

* :mod:`deqfusion.adapters.mutan.network` -- block's own network factory builds block's ``VQANet``
  (skip-thoughts question encoder, Mutan attention over the 36 regions, Mutan answer fusion); the
  answer fusion ``net.fusion`` (q (B, 4800) x v (B, 4096) -> logits (B, nans)) is then replaced by
  :class:`~deqfusion.adapters.mutan.head.DEQClassifier`: q and v projected to ``dim`` (Mutan's
  ``mm_dim``, 700), DEQ fusion, a linear layer to the answers.  Its Jacobian term and solver statistics join the network's output;
* :mod:`deqfusion.adapters.mutan.criterion` -- block's own criterion (VQA cross-entropy) plus
  ``jac_weight x`` the Jacobian term, and the statistics as scalars for bootstrap's logger.

Settings: the ``model.network.deq`` section of the options (so every value is a bootstrap flag, e.g.
``--model.network.deq.jac_weight 0.01``, and is saved with the experiment in ``options.yaml``), made
and checked by :class:`Settings`, the shared :class:`~deqfusion.adapters.common.settings.FusionSettings`.
bootstrap's options are the one way in for this upstream; a ``DEQFUSION_MUTAN_*`` variable is an error
that names the flag to use instead.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from ..common.settings import FusionSettings, SettingsError

__all__ = [
    "Settings", "SettingsError", "settings_from_options", "current_settings",
    "UPSTREAM_NAME", "UPSTREAM_COMMIT", "BOOTSTRAP_VERSION", "SAMPLE_KEYS", "STAT_KEYS",
]

UPSTREAM_NAME = "mutan"
UPSTREAM_COMMIT = "e938e9e269d2ec67499db327b903edbe821fed5f"
BOOTSTRAP_VERSION = "0.0.13"
DEFAULT_DIM = 700            # Mutan's mm_dim in block/options/vqa2/mutan.yaml
DEFAULT_JAC_WEIGHT = 0.1     # our choice: the paper states none for VQA (docs/mutan.md)
# per-sample outputs the network adds, shape (B, 1): bootstrap's DataParallel gathers them along the
# batch and its logger (which calls .item() on tensors of dim <= 1) leaves them to the criterion
SAMPLE_KEYS = ("deq_sample_jac_loss", "deq_sample_nstep", "deq_sample_rel_residual", "deq_sample_converged")
# the scalars the criterion makes of them (logged as train_batch.<key>, train_epoch.<key>, eval_epoch.<key>)
STAT_KEYS = ("loss_vqa", "jac_loss", "deq_nstep", "deq_rel_residual_max", "deq_converged")


@dataclass(frozen=True)
class Settings(FusionSettings):
    """The ``model.network.deq`` section: ``fusion`` (``deq`` or ``mutan``), ``ablation``, ``dim`` (the
    common width q and v are projected to), ``jac_weight`` and DEQFusion ``options``."""

    upstream: ClassVar[str] = UPSTREAM_NAME
    baseline: ClassVar[str] = "mutan"
    default_options: ClassVar[Mapping[str, Any]] = {}

    jac_weight: float = DEFAULT_JAC_WEIGHT
    dim: int = DEFAULT_DIM

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise SettingsError(f"model.network.deq.dim must be a positive integer, got {self.dim!r}")

    @classmethod
    def from_section(cls, section: Optional[Mapping[str, Any]]) -> Settings:
        """Settings from a ``model.network.deq`` mapping (missing keys keep their defaults)."""
        data = _plain(section or {})
        names = [f.name for f in dataclasses.fields(cls)]
        stray = sorted(set(data) - set(names))
        if stray:
            raise SettingsError(f"unknown key model.network.deq.{stray[0]}; it takes {', '.join(names)}")
        if data.get("options") is None:
            data.pop("options", None)
        return cls(**data)


def _plain(value: Any) -> Any:
    """bootstrap's OptionsDict (an OrderedDict subclass) and lists -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _refuse_env(environ: Optional[Mapping[str, str]] = None) -> None:
    env = os.environ if environ is None else environ
    prefix = Settings.env_prefix()
    found = sorted(k for k in env if k.startswith(prefix))
    if found:
        field = found[0][len(prefix):].lower()
        raise SettingsError(
            f"{found[0]} is set, but Mutan's DEQ settings are bootstrap options: unset it and pass "
            f"--model.network.deq.{field} VALUE (or edit the model.network.deq section of the options file)")


def settings_from_options(options: Any = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    """The settings of this run: ``options['model']['network']['deq']`` (bootstrap's ``Options()`` by default)."""
    _refuse_env(environ)
    if options is None:
        from bootstrap.lib.options import Options

        options = Options()
    network = options["model"]["network"]
    section = network["deq"] if "deq" in network else None
    return Settings.from_section(section)


current_settings = settings_from_options

