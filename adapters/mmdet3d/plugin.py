"""What the project config's ``custom_imports`` imports: the CPU stand-ins where mmcv lacks a kernel, then
the registration of ``DEQFusionVoteHead`` in mmdet3d's MODELS (see :mod:`.cpu_ops`, :mod:`.head`)."""
from __future__ import annotations

from . import cpu_ops

STANDINS = cpu_ops.install()  # before mmdet3d.models: mmcv-lite's missing mmcv._ext must be in place first

from .head import JAC_KEY, DEQFusionVoteHead  # noqa: E402  (registers the head)

STANDINS["bound"] += cpu_ops.install_point_ops()  # modules imported with mmdet3d.models, if any bound an original

__all__ = ["DEQFusionVoteHead", "JAC_KEY", "STANDINS"]
