"""A stand-in for ``mmcv._ext`` (the compiled ops mmcv-lite lacks): only what ImVoteNet's CPU test path calls.

mmcv-lite 2.1.0 ships mmcv's Python code without its C++/CUDA extension, so ``import mmcv.ops`` (and
with it ``import mmdet3d.models``) fails with ``No module named 'mmcv._ext'``.  mmcv's op modules only
ask the extension for names (``mmcv/utils/ext_loader.py`` checks ``hasattr``), so a module that has
every name lets them import.  Three kernels get a pure-PyTorch implementation, with the semantics of
mmcv 2.1.0's CPU kernels (``mmcv/ops/csrc/pytorch/cpu/{nms,roi_align,points_in_boxes}.cpp``):

- ``nms``: greedy NMS by descending score, IoU with mmcv's ``offset`` (0 or 1), suppress ``IoU > thr``
  (ImVoteNet's frozen 2D RPN and RoI head);
- ``roi_align_forward``: RoIAlign, ``avg`` and ``max`` pooling, ``aligned`` and adaptive
  ``sampling_ratio=0`` (the 2D RoI head's feature extractor; forward only: the 2D branch is frozen);
- ``points_in_boxes_cpu_forward``: which points lie in which yawed 3D box (VoteHead's targets and
  post-processing, through ``mmcv.ops.points_in_boxes_cpu``).

Every other name is a function that raises ``NotImplementedError`` naming the fix (full mmcv).  The
PointNet++ ops are not stood in here: ``cpu_ops`` replaces their Python wrappers, because mmcv's own
wrappers allocate ``torch.cuda`` tensors and have no CPU kernel even in the full build.
"""
from __future__ import annotations

import importlib.machinery
import types
from typing import Callable, Dict, List

import numpy as np
import torch

MODULE_NAME = "mmcv._ext"
FULL_MMCV_FIX = ("install the full mmcv==2.1.0 (pip install \"setuptools<81\" && pip install --no-build-isolation "
                 "mmcv==2.1.0, about 14 min to build; see docs/mmdet3d.md) instead of mmcv-lite")


# Largest block of samples (RoIs x channels x samples) RoIAlign computes at once.
_BLOCK_ELEMS = 1 << 24


class StandInMissing(NotImplementedError):
    """An mmcv._ext kernel the stand-in does not provide."""


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """(N, 4) x1y1x2y2 boxes, (N,) scores -> kept indices (int64), highest score first."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].detach().to(torch.float32)
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    over = (inter / (area[:, None] + area[None, :] - inter) > float(iou_threshold)).cpu().numpy()
    keep = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ~over[i, i + 1:]
    return order[torch.from_numpy(keep).to(order.device)]


def _axis_samples(start: torch.Tensor, bin_size: torch.Tensor, pooled: int, grid: int, size: int):
    """(R,) roi starts and bin sizes -> the 1-D bilinear taps of the R x pooled*grid sample positions.

    Sample k of bin p sits at ``start + p*bin + (k+0.5)*bin/grid``; outside ``[-1, size]`` it reads 0,
    below 0 it is clamped to 0, at or past ``size-1`` it reads the last pixel.  Returns
    ``(low, high, w_low, w_high)``, each (R, pooled*grid), with the zero of an outside sample in the weights.
    """
    steps = torch.arange(pooled * grid, device=start.device, dtype=start.dtype)
    p, k = torch.div(steps, grid, rounding_mode="floor"), steps % grid
    pos = start[:, None] + p[None] * bin_size[:, None] + (k[None] + 0.5) * bin_size[:, None] / grid
    inside = ((pos >= -1.0) & (pos <= size)).to(pos.dtype)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return low, high, (1 - frac) * inside, frac * inside


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int = 7, aligned_width: int = 7,
                      spatial_scale: float = 1.0, sampling_ratio: int = 0, pool_mode: int = 1,
                      aligned: bool = True) -> None:
    """Fill ``output`` (R, C, ph, pw) with RoIAlign of ``input`` (N, C, H, W) over ``rois`` (R, 5: b, x1, y1, x2, y2).

    Each sample is the bilinear mix of its four neighbours (weight ``wy * wx``; a sample outside the map
    reads 0 along either axis); RoIs with the same image and sampling grid are done together, then each
    bin pools its ``grid_h x grid_w`` samples.  Max pooling (``pool_mode=0``) fills the values only;
    ``argmax_y/x`` (for the backward) stay unset.
    """
    if rois.numel() == 0:
        return
    if pool_mode == 0:
        argmax_y.fill_(-1.0)
        argmax_x.fill_(-1.0)
    _, channels, height, width = input.shape
    ph, pw = int(aligned_height), int(aligned_width)
    r = rois.detach().to(input.dtype)
    shift = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - shift, r[:, 2] * spatial_scale - shift
    roi_w, roi_h = r[:, 3] * spatial_scale - shift - x1, r[:, 4] * spatial_scale - shift - y1
    if aligned and bool(((roi_w < 0) | (roi_h < 0)).any()):
        raise ValueError("ROIs in ROIAlign cannot have negative size")
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph).long(), torch.ceil(roi_w / pw).long()
    groups: Dict[tuple, List[int]] = {}
    for i, key in enumerate(zip(r[:, 0].long().tolist(), grid_h.tolist(), grid_w.tolist())):
        groups.setdefault(key, []).append(i)
    flat = input.detach().reshape(input.shape[0], channels, height * width)
    for (b, gh, gw), members in groups.items():
        if gh <= 0 or gw <= 0:  # an empty sampling grid averages nothing: 0, as the kernel's sum / max(count, 1)
            output[torch.tensor(members, device=rois.device)] = 0 if pool_mode == 1 else -10000.0
            continue
        step = max(1, _BLOCK_ELEMS // (channels * ph * gh * pw * gw))
        for lo in range(0, len(members), step):
            idx = torch.tensor(members[lo:lo + step], device=rois.device)
            n = len(members[lo:lo + step])
            ys = _axis_samples(y1[idx], roi_h[idx] / ph, ph, gh, height)  # each (n, ph*gh)
            xs = _axis_samples(x1[idx], roi_w[idx] / pw, pw, gw, width)   # each (n, pw*gw)
            samples = 0
            for y, wy in ((ys[0], ys[2]), (ys[1], ys[3])):
                for x, wx in ((xs[0], xs[2]), (xs[1], xs[3])):
                    where = (y[:, :, None] * width + x[:, None, :]).reshape(1, -1).expand(channels, -1)
                    taps = flat[b].gather(1, where).reshape(channels, n, ph * gh, pw * gw)
                    samples = samples + taps * (wy[:, :, None] * wx[:, None, :])
            samples = samples.reshape(channels, n, ph, gh, pw, gw).permute(1, 0, 2, 3, 4, 5)
            if pool_mode == 1:
                pooled = samples.mean(dim=(3, 5))
            else:
                pooled = samples.amax(dim=(3, 5)).clamp(min=-10000.0)
            output[idx] = pooled.to(output.dtype)


def points_in_boxes_cpu_forward(boxes: torch.Tensor, pts: torch.Tensor, pts_indices: torch.Tensor) -> None:
    """Fill ``pts_indices`` (T, P) int with 1 where point p lies in box t.

    Boxes are (T, 7) ``x, y, z, x_size, y_size, z_size, rz`` with z the bottom centre; a point is in
    when ``|z - z_centre| <= z_size/2`` and its coordinates in the box frame (rotated by ``-rz``) lie
    strictly inside ``x_size/2`` and ``y_size/2``.
    """
    if boxes.numel() == 0 or pts.numel() == 0:
        return
    b, p = boxes.detach().float(), pts.detach().float()
    half = b[:, None, 3:6] / 2
    zc = b[:, None, 2] + half[..., 2]
    dx, dy = p[None, :, 0] - b[:, None, 0], p[None, :, 1] - b[:, None, 1]
    cos, sin = torch.cos(-b[:, None, 6]), torch.sin(-b[:, None, 6])
    local_x, local_y = dx * cos - dy * sin, dx * sin + dy * cos
    inside = ((p[None, :, 2] - zc).abs() <= half[..., 2]) & (local_x.abs() < half[..., 0]) & (local_y.abs() < half[..., 1])
    pts_indices.copy_(inside.to(pts_indices.dtype))


PROVIDED: Dict[str, Callable] = {
    "nms": nms,
    "roi_align_forward": roi_align_forward,
    "points_in_boxes_cpu_forward": points_in_boxes_cpu_forward,
}


def _missing(name: str) -> Callable:
    def kernel(*args, **kwargs):
        raise StandInMissing(
            f"mmcv._ext.{name} is not available: this is mmcv-lite with deqfusion's stand-in, which provides only "
            f"{', '.join(sorted(PROVIDED))} (plus the PointNet++ ops through deqfusion.adapters.mmdet3d.cpu_ops); "
            f"{FULL_MMCV_FIX}")

    kernel.__name__ = name
    return kernel


def make_module() -> types.ModuleType:
    """The module to put at ``sys.modules['mmcv._ext']``: PROVIDED kernels, every other name raises."""
    module = types.ModuleType(MODULE_NAME, "deqfusion's stand-in for mmcv's compiled ops (mmcv-lite)")
    # a spec without a loader: importlib/pkgutil lookups work, and mmengine's mmcv_full_available() stays False
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, None)
    module.__dict__.update(PROVIDED)
    module.DEQFUSION_STANDIN = True

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    module.__getattr__ = __getattr__  # PEP 562: hasattr() is true for every kernel name mmcv asks for
    return module
