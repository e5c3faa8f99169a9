"""Run mmdet3d's ImVoteNet where mmcv has no kernel: the project's stand-ins, installed at run time.

Two gaps, measured with mmcv 2.1.0 (docs/mmdet3d.md):

1. mmcv-lite has no ``mmcv._ext`` at all, so ``import mmcv.ops`` fails.  :func:`install_ext_standin`
   puts :mod:`.ext_standin` at ``sys.modules['mmcv._ext']`` (NMS, RoIAlign, points-in-boxes; every other
   kernel raises naming the fix).  With the full mmcv build it does nothing.
2. Even the full build has CUDA kernels only for the PointNet++ ops, and its wrappers allocate
   ``torch.cuda`` tensors (``furthest_point_sample``) or call ``torch.cuda.current_device()``
   (``points_in_boxes_all``).  :func:`install_point_ops` replaces the wrappers, wherever mmcv and mmdet3d
   bound them, by functions with mmcv's signatures that call mmcv's own op for CUDA tensors when the real
   extension is there, and otherwise the pure-PyTorch ops of :mod:`deqfusion.adapters.common.point_ops`
   (``points_in_boxes_all``: mmcv's own ``points_in_boxes_cpu``).  So GPU training is unchanged.

Signature differences handled here: mmcv's ``ball_query(min_radius, max_radius, sample_num, xyz,
center_xyz)`` (point_ops has no ``min_radius``; with ``min_radius == 0`` the kernel's ball is the same),
``grouping_operation`` is point_ops' ``group_points``, ``three_nn(target, source)`` returns Euclidean
distances like point_ops'.  mmcv's stacked (``*_batch_cnt``) variants have no stand-in.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable, Dict, List

import torch

from ..common import point_ops
from . import ext_standin

log = logging.getLogger(__name__)

# mmcv.ops name -> the module of mmcv that defines it
WRAPPED: Dict[str, str] = {
    "furthest_point_sample": "mmcv.ops.furthest_point_sample",
    "gather_points": "mmcv.ops.gather_points",
    "ball_query": "mmcv.ops.ball_query",
    "grouping_operation": "mmcv.ops.group_points",
    "three_nn": "mmcv.ops.three_nn",
    "three_interpolate": "mmcv.ops.three_interpolate",
    "points_in_boxes_all": "mmcv.ops.points_in_boxes",
}
_PATCHED_PREFIXES = ("mmcv", "mmdet3d", "mmdet")


class NoStandIn(NotImplementedError):
    """A call the stand-ins do not cover; the message names the fix."""


def ext_is_standin() -> bool:
    return bool(getattr(sys.modules.get(ext_standin.MODULE_NAME), "DEQFUSION_STANDIN", False))


def install_ext_standin() -> bool:
    """Give mmcv-lite an ``mmcv._ext`` (before anything imports ``mmcv.ops``). True if the stand-in is in place."""
    if ext_standin.MODULE_NAME in sys.modules:
        return ext_is_standin()
    import mmcv

    try:
        importlib.import_module(ext_standin.MODULE_NAME)
        return False  # the full build: real kernels
    except ImportError:
        pass
    module = ext_standin.make_module()
    sys.modules[ext_standin.MODULE_NAME] = module
    mmcv._ext = module
    log.warning("mmcv has no compiled ops (mmcv-lite): using deqfusion's stand-ins for %s; enough for CPU "
                "tests, not for training (%s)", ", ".join(sorted(ext_standin.PROVIDED)), ext_standin.FULL_MMCV_FIX)
    return True


def _native(*tensors: torch.Tensor) -> bool:
    """mmcv's own op can run: real extension and CUDA tensors (its PointNet++ kernels are CUDA-only)."""
    return not ext_is_standin() and all(t.is_cuda for t in tensors)


def _no_stacked(name: str) -> NoStandIn:
    return NoStandIn(f"mmcv.ops.{name} on stacked (*_batch_cnt) inputs has no CPU stand-in: run it on CUDA with the "
                     "full mmcv build")


def _make_wrappers(orig: Dict[str, Callable]) -> Dict[str, Callable]:
    def furthest_point_sample(points_xyz, num_points):
        if _native(points_xyz):
            return orig["furthest_point_sample"](points_xyz, num_points)
        return point_ops.furthest_point_sample(points_xyz, int(num_points))

    def gather_points(features, indices):
        if _native(features, indices):
            return orig["gather_points"](features, indices)
        return point_ops.gather_points(features, indices)

    def ball_query(min_radius, max_radius, sample_num, xyz, center_xyz, xyz_batch_cnt=None,
                   center_xyz_batch_cnt=None):
        if _native(xyz, center_xyz):
            return orig["ball_query"](min_radius, max_radius, sample_num, xyz, center_xyz, xyz_batch_cnt,
                                      center_xyz_batch_cnt)
        if xyz_batch_cnt is not None or center_xyz_batch_cnt is not None:
            raise _no_stacked("ball_query")
        if min_radius > 0:
            raise NoStandIn(f"mmcv.ops.ball_query with min_radius={min_radius} (a shell, not a ball) has no CPU "
                            "stand-in: point_ops.ball_query covers min_radius=0, which ImVoteNet uses")
        return point_ops.ball_query(float(max_radius), int(sample_num), xyz.contiguous(), center_xyz.contiguous())

    def grouping_operation(features, indices, features_batch_cnt=None, indices_batch_cnt=None):
        if _native(features, indices):
            return orig["grouping_operation"](features, indices, features_batch_cnt, indices_batch_cnt)
        if features_batch_cnt is not None or indices_batch_cnt is not None:
            raise _no_stacked("grouping_operation")
        return point_ops.group_points(features, indices)

    def three_nn(target, source):
        if _native(target, source):
            return orig["three_nn"](target, source)
        return point_ops.three_nn(target, source)

    def three_interpolate(features, indices, weight):
        if _native(features, indices, weight):
            return orig["three_interpolate"](features, indices, weight)
        return point_ops.three_interpolate(features, indices, weight)

    def points_in_boxes_all(points, boxes):
        if _native(points, boxes):
            return orig["points_in_boxes_all"](points, boxes)
        from mmcv.ops import points_in_boxes_cpu  # mmcv's CPU kernel (the stand-in's under mmcv-lite)

        return points_in_boxes_cpu(points, boxes).to(points.device)

    wrappers = dict(furthest_point_sample=furthest_point_sample, gather_points=gather_points, ball_query=ball_query,
                    grouping_operation=grouping_operation, three_nn=three_nn, three_interpolate=three_interpolate,
                    points_in_boxes_all=points_in_boxes_all)
    for name, fn in wrappers.items():
        fn.__wrapped__ = orig[name]
        fn.__qualname__ = f"deqfusion_standin.{name}"
        fn.deqfusion_standin = True
    return wrappers


def _rebind(orig: Dict[str, Callable], wrappers: Dict[str, Callable]) -> List[str]:
    """Replace each original wherever an mmcv/mmdet/mmdet3d module bound it; returns 'module.name' entries."""
    done = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(_PATCHED_PREFIXES):
            continue
        for name, fn in orig.items():
            if getattr(module, name, None) is fn:
                setattr(module, name, wrappers[name])
                done.append(f"{mod_name}.{name}")
    return done


def install_point_ops() -> List[str]:
    """Install the dispatching wrappers (idempotent); returns the bindings replaced by this call."""
    orig: Dict[str, Callable] = {}
    for name, mod_name in WRAPPED.items():
        current = getattr(importlib.import_module(mod_name), name)
        orig[name] = getattr(current, "__wrapped__", current) if getattr(current, "deqfusion_standin", False) else current
    installed = getattr(install_point_ops, "_wrappers", None)
    if installed is None:
        installed = install_point_ops._wrappers = _make_wrappers(orig)
    done = _rebind(orig, installed)
    if done:
        log.info("deqfusion CPU stand-ins for mmcv point ops bound at %d places", len(done))
    return done


def install() -> Dict[str, object]:
    """Both steps, in order (the ``_ext`` stand-in must precede ``import mmcv.ops``)."""
    standin = install_ext_standin()
    bound = install_point_ops()
    return {"ext": "standin" if standin else "mmcv", "bound": bound}
