"""Pure-PyTorch equivalents of the six PointNet++ ops of votenet/imvotenet (``pointnet2/_ext_src``).

The upstreams ship these as CUDA kernels only (their CPU branch is ``AT_CHECK(false, "CPU not
supported")``), so code that needs PointNet++ cannot run on a machine without CUDA.  These functions
reproduce the kernels' results, edge cases included, on any device and in any float dtype:

- ``furthest_point_sample``: starts at index 0; points with ``x²+y²+z² <= 1e-3`` are never picked
  after that (the kernel skips them); ties are broken the way the kernel's 512-thread reduction
  breaks them, so duplicate points give the same indices as the GPU.
- ``ball_query``: the first ``nsample`` indices (in point order) with ``d² < radius²``; missing slots
  repeat the first index found; a centre with no point in its ball gets all zeros.
- ``three_nn``: the three nearest known points, ties to the lower index, with the *Euclidean*
  distance (the upstream's Python wrapper returns ``sqrt`` of the kernel's squared distance;
  ``three_nn_squared`` gives the kernel's own output).  With fewer than three known points the
  empty slots hold index 0 and distance ``inf``.
- ``gather_points``, ``group_points``, ``three_interpolate``: indexing and weighted sums, differentiable
  w.r.t. ``features`` (gradients accumulate over repeated indices, as the kernels' ``atomicAdd``);
  like the upstream's autograd wrappers, ``three_interpolate`` passes no gradient to ``weight``.

Distances use the kernels' per-coordinate formula (not the ``|a|² - 2ab + |b|²`` expansion), and the
pairwise blocks are computed in chunks of at most ``_CHUNK_ELEMS`` elements, so a (2, 20000) cloud
never allocates an N×N matrix.  Indices come back as ``int32``, like the kernels'.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "furthest_point_sample",
    "gather_points",
    "ball_query",
    "group_points",
    "three_nn",
    "three_nn_squared",
    "three_interpolate",
]

# Largest pairwise-distance block (batch x rows x columns) computed at once.
_CHUNK_ELEMS = 1 << 22
# The kernels launch min(2**floor(log2 n), 512) threads per batch element (cuda_utils.h).
_TOTAL_THREADS = 512


def _check_xyz(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"{name} must be (B, N, 3) coordinates, got shape {tuple(t.shape)}")


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, 3), (B, N, 3) -> (B, M, N) squared distances, the kernels' formula term by term."""
    d = a[:, :, None, 0] - b[:, None, :, 0]
    out = d * d
    d = a[:, :, None, 1] - b[:, None, :, 1]
    out += d * d
    d = a[:, :, None, 2] - b[:, None, :, 2]
    out += d * d
    return out


def _row_chunks(batch: int, rows: int, cols: int):
    """Row ranges such that each (batch, chunk, cols) block has at most _CHUNK_ELEMS elements."""
    step = max(1, _CHUNK_ELEMS // max(1, batch * cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _n_threads(work: int) -> int:
    """opt_n_threads of cuda_utils.h: the largest power of two <= work, capped at 512, at least 1."""
    if work < 1:
        return 1
    return min(1 << (work.bit_length() - 1), _TOTAL_THREADS)


def _bit_reverse(values: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(values)
    for b in range(bits):
        out |= ((values >> b) & 1) << (bits - 1 - b)
    return out


def _fps_order(n: int, device: torch.device) -> torch.Tensor:
    """Point indices in the order the FPS kernel prefers them on equal distance.

    Thread ``t`` scans ``k = t, t + T, ...`` keeping the first strict maximum; the shared-memory
    tree reduction then keeps the left operand on ties, which favours threads in bit-reversed order.
    Sorting the points by (bit-reversed thread, position in thread) makes ``argmax``'s first maximum
    the kernel's winner.
    """
    threads = _n_threads(n)
    k = torch.arange(n, device=device)
    tid = k % threads
    key = _bit_reverse(tid, threads.bit_length() - 1) * (n // threads + 1) + k // threads
    return torch.argsort(key)


def furthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """(B, N, 3) -> (B, npoint) int32 indices of iterative furthest point sampling (first index 0)."""
    _check_xyz("xyz", xyz)
    batch, n, _ = xyz.shape
    out = torch.zeros(batch, max(npoint, 0), dtype=torch.int32, device=xyz.device)
    if npoint <= 1 or n == 0:
        return out
    with torch.no_grad():
        order = _fps_order(n, xyz.device)
        pts = xyz.detach()[:, order]  # (B, N, 3) in the kernel's tie order; order[0] == 0
        valid = (pts * pts).sum(-1) > 1e-3
        temp = torch.full((batch, n), 1e10, dtype=pts.dtype, device=pts.device)
        neg = torch.full_like(temp, -1.0)
        rows = torch.arange(batch, device=pts.device)
        old = torch.zeros(batch, dtype=torch.long, device=pts.device)
        for j in range(1, npoint):
            centre = pts[rows, old][:, None, :]  # (B, 1, 3)
            d = _sqdist(centre, pts)[:, 0]  # (B, N)
            temp = torch.where(valid, torch.minimum(d, temp), temp)
            old = torch.where(valid, temp, neg).argmax(dim=1)
            out[:, j] = order[old].to(torch.int32)
    return out


def gather_points(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, N), (B, M) -> (B, C, M): ``features[b, :, idx[b, m]]``, differentiable w.r.t. features."""
    batch, channels, _ = features.shape
    index = idx.long()[:, None, :].expand(batch, channels, idx.shape[1])
    return features.gather(2, index)


def ball_query(radius: float, nsample: int, xyz: torch.Tensor, new_xyz: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) points, (B, M, 3) centres -> (B, M, nsample) int32: first points with d² < radius²."""
    _check_xyz("xyz", xyz)
    _check_xyz("new_xyz", new_xyz)
    batch, n, _ = xyz.shape
    m = new_xyz.shape[1]
    out = torch.zeros(batch, m, nsample, dtype=torch.int32, device=xyz.device)
    if n == 0 or m == 0 or nsample <= 0:
        return out
    r2 = radius * radius
    with torch.no_grad():
        pts, centres = xyz.detach(), new_xyz.detach()
        targets = torch.arange(1, nsample + 1, dtype=torch.int64, device=xyz.device)
        for lo, hi in _row_chunks(batch, m, n):
            inside = _sqdist(centres[:, lo:hi], pts) < r2  # (B, c, N)
            count = inside.cumsum(-1)  # int64, non-decreasing along N
            want = targets.expand(batch, hi - lo, nsample).contiguous()
            pos = torch.searchsorted(count, want)  # first k with count[k] >= s: the s-th point inside
            first = pos[..., :1]
            fill = torch.where(first < n, first, torch.zeros_like(first))
            out[:, lo:hi] = torch.where(pos < n, pos, fill).to(torch.int32)
    return out


def group_points(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, N), (B, M, K) -> (B, C, M, K): ``features[b, :, idx[b, m, k]]``, differentiable."""
    batch, channels, n = features.shape
    _, m, k = idx.shape
    # gather from a (B, C, N, K) expanded view: the result is a new tensor, not a view of one, so that
    # it may be returned from an autograd.Function and modified in place (QueryAndGroup does both)
    index = idx.long()[:, None].expand(batch, channels, m, k)
    return features[..., None].expand(batch, channels, n, k).gather(2, index)


def three_nn_squared(unknown: torch.Tensor, known: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel's own output: (B, n, 3) *squared* distances and int32 indices of the 3 nearest known."""
    _check_xyz("unknown", unknown)
    _check_xyz("known", known)
    batch, n, _ = unknown.shape
    m = known.shape[1]
    dist2 = torch.full((batch, n, 3), float("inf"), dtype=unknown.dtype, device=unknown.device)
    idx = torch.zeros(batch, n, 3, dtype=torch.int32, device=unknown.device)
    if n == 0 or m == 0:
        return dist2, idx
    with torch.no_grad():
        u, k = unknown.detach(), known.detach()
        for lo, hi in _row_chunks(batch, n, m):
            d = _sqdist(u[:, lo:hi], k)  # (B, c, m)
            for slot in range(min(3, m)):
                best = d.argmin(dim=-1, keepdim=True)  # first minimum: ties go to the lower index
                dist2[:, lo:hi, slot] = d.gather(-1, best)[..., 0]
                idx[:, lo:hi, slot] = best[..., 0].to(torch.int32)
                d.scatter_(-1, best, float("inf"))
    return dist2, idx


def three_nn(unknown: torch.Tensor, known: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, n, 3), (B, m, 3) -> (dist (B, n, 3) Euclidean, idx (B, n, 3) int32), as pointnet2_utils.three_nn."""
    dist2, idx = three_nn_squared(unknown, known)
    return torch.sqrt(dist2), idx


def three_interpolate(features: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C, m), (B, n, 3), (B, n, 3) -> (B, C, n): ``sum_j weight[b, i, j] * features[b, :, idx[b, i, j]]``.

    Differentiable w.r.t. ``features`` only (``weight`` gets no gradient, as in the upstream wrapper).
    """
    batch, channels, _ = features.shape
    n = idx.shape[1]
    index = idx.long().reshape(batch, 1, n * 3).expand(batch, channels, n * 3)
    picked = features.gather(2, index).reshape(batch, channels, n, 3)
    return (picked * weight.detach().to(features.dtype)[:, None]).sum(-1)
