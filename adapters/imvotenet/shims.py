"""Run-time stand-ins that let ImVoteNet's own scripts run where its environment cannot be had.

Nothing here is written into the clone; the runner's launcher installs them in its own process:

- ``pointnet2._ext``: ImVoteNet's PointNet++ ops are a CUDA-only extension (``pointnet2/setup.py``;
  its CPU branch raises "CPU not supported"). :func:`pointnet2_ext` builds a module with the same
  nine functions (the names and argument orders of ``pointnet2/_ext_src/src/bindings.cpp``) on the
  project's pure-PyTorch ops (:mod:`deqfusion.adapters.common.point_ops`); the gradients of the
  three differentiable ops come from autograd through those same ops.
- ``torch.cuda.FloatTensor(...)``: loss_helper.py builds its one-hot labels with the legacy CUDA
  tensor constructors; :func:`legacy_cuda_tensors` makes ``torch.cuda.<Type>Tensor(...)`` build the
  CPU tensor type instead (the companion of the ``.cuda()`` shim, for the same machines).
- ``trimesh.io``: eval.py dumps boxes through ``trimesh.io.export.export_mesh``; trimesh 3.0 renamed
  the package to ``trimesh.exchange`` and the README's trimesh 2.35.39 does not import on Python
  >= 3.10, so with a newer trimesh the old name is pointed at the new module (same function).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Iterator, List, Union

import torch

from ..common import point_ops

__all__ = ["pointnet2_ext", "install_pointnet2_ext", "install_trimesh_io_alias", "legacy_cuda_tensors", "EXT_FUNCTIONS"]

EXT_FUNCTIONS = ("gather_points", "gather_points_grad", "furthest_point_sampling", "three_nn",
                 "three_interpolate", "three_interpolate_grad", "ball_query", "group_points", "group_points_grad")


def _adjoint(op, grad_out: torch.Tensor, shape, *args) -> torch.Tensor:
    """d<op(features, *args), grad_out>/d features at any features (the ops are linear in them)."""
    with torch.enable_grad():
        features = grad_out.new_zeros(shape, requires_grad=True)
        (grad,) = torch.autograd.grad(op(features, *args), features, grad_out)
    return grad


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return point_ops.gather_points(points, idx)


def gather_points_grad(grad_out: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return _adjoint(point_ops.gather_points, grad_out, (grad_out.shape[0], grad_out.shape[1], n), idx)


def furthest_point_sampling(points: torch.Tensor, nsamples: int) -> torch.Tensor:
    return point_ops.furthest_point_sample(points, nsamples)


def three_nn(unknowns: torch.Tensor, knows: torch.Tensor) -> List[torch.Tensor]:
    """[dist2, idx]: the kernel returns *squared* distances (the Python wrapper takes the sqrt)."""
    dist2, idx = point_ops.three_nn_squared(unknowns, knows)
    return [dist2, idx]


def three_interpolate(points: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return point_ops.three_interpolate(points, idx, weight)


def three_interpolate_grad(grad_out: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
    return _adjoint(point_ops.three_interpolate, grad_out, (grad_out.shape[0], grad_out.shape[1], m), idx, weight)


def ball_query(new_xyz: torch.Tensor, xyz: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """The binding's order (new_xyz, xyz, radius, nsample), not point_ops'."""
    return point_ops.ball_query(radius, nsample, xyz, new_xyz)


def group_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return point_ops.group_points(points, idx)


def group_points_grad(grad_out: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return _adjoint(point_ops.group_points, grad_out, (grad_out.shape[0], grad_out.shape[1], n), idx)


def pointnet2_ext() -> types.ModuleType:
    """A module standing in for the compiled ``pointnet2._ext`` (pure PyTorch, any device)."""
    mod = types.ModuleType("pointnet2._ext", "deqfusion's pure-PyTorch stand-in for ImVoteNet's PointNet++ CUDA ops")
    this = sys.modules[__name__]
    for name in EXT_FUNCTIONS:
        setattr(mod, name, getattr(this, name))
    mod.__deqfusion_stand_in__ = True
    return mod


@contextlib.contextmanager
def install_pointnet2_ext() -> Iterator[types.ModuleType]:
    """``import pointnet2._ext`` gives the stand-in inside the block (sys.modules restored after).

    ``import pointnet2._ext as _ext`` also imports the parent ``pointnet2`` (the clone's folder, a
    namespace package when the clone's root is on sys.path); where it cannot be found, an empty
    package stands in for it too.
    """
    names = ("pointnet2", "pointnet2._ext")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    mod = pointnet2_ext()
    if "pointnet2" not in sys.modules and importlib.util.find_spec("pointnet2") is None:
        parent = types.ModuleType("pointnet2", "stand-in parent package of deqfusion's pointnet2._ext")
        parent.__path__ = []
        sys.modules["pointnet2"] = parent
    sys.modules["pointnet2._ext"] = mod
    try:
        yield mod
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def install_trimesh_io_alias() -> bool:
    """Point ``trimesh.io.export`` at ``trimesh.exchange.export`` where trimesh has no ``io``; True if done."""
    try:
        trimesh = importlib.import_module("trimesh")
    except ImportError:
        return False
    if hasattr(trimesh, "io"):
        return False
    export = importlib.import_module("trimesh.exchange.export")
    io = types.ModuleType("trimesh.io", "alias of trimesh.exchange (renamed in trimesh 3.0), set by deqfusion")
    io.export = export
    trimesh.io = io
    sys.modules["trimesh.io"] = io
    sys.modules["trimesh.io.export"] = export
    return True


LEGACY_TENSOR_TYPES = ("FloatTensor", "DoubleTensor", "HalfTensor", "LongTensor", "IntTensor", "ShortTensor",
                       "ByteTensor", "CharTensor", "BoolTensor")


@contextlib.contextmanager
def legacy_cuda_tensors(device: Union[str, torch.device] = "cpu") -> Iterator[None]:
    """Inside the block ``torch.cuda.FloatTensor(*sizes)`` (and the other legacy types) build
    ``torch.FloatTensor(*sizes)`` on ``device``; the originals are put back after."""
    target = torch.device(device)
    saved = {name: getattr(torch.cuda, name) for name in LEGACY_TENSOR_TYPES if hasattr(torch.cuda, name)}

    def constructor(name: str):
        cpu_type = getattr(torch, name)

        def make(*args, **kwargs):
            return cpu_type(*args, **kwargs).to(target)

        make.__name__ = name
        return make

    for name in saved:
        setattr(torch.cuda, name, constructor(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)
