"""The run-time stand-ins in the mmdet3d venv: mmcv's op names now reach the project's pure-PyTorch ops on CPU,
with mmcv's signatures (argument order, ball_query's min_radius, return types)."""
from __future__ import annotations

import sys

import pytest
import torch

from deqfusion.adapters.common import point_ops
from deqfusion.adapters.mmdet3d import cpu_ops, plugin

torch.set_num_threads(1)


def test_plugin_installed_the_standins_everywhere_mmcv_and_mmdet3d_bound_them():
    import mmcv.ops
    import mmdet3d.models.dense_heads.vote_head as vote_head
    import mmdet3d.models.layers.pointnet_modules.point_fp_module as fp
    import mmdet3d.models.layers.pointnet_modules.point_sa_module as sa
    import mmdet3d.structures.bbox_3d.base_box3d as base_box3d

    for fn in (mmcv.ops.furthest_point_sample, vote_head.furthest_point_sample, fp.three_nn, fp.three_interpolate,
               sa.gather_points, base_box3d.points_in_boxes_all, sys.modules["mmcv.ops.group_points"].ball_query,
               sys.modules["mmcv.ops.points_sampler"].furthest_point_sample):
        assert getattr(fn, "deqfusion_standin", False), fn
    assert plugin.STANDINS["ext"] in ("standin", "mmcv")
    assert cpu_ops.install_point_ops() == []                       # idempotent: nothing left to rebind


def test_wrappers_keep_mmcv_signatures():
    import mmcv.ops as ops

    g = torch.Generator().manual_seed(0)
    xyz, centres = torch.rand(2, 50, 3, generator=g), torch.rand(2, 7, 3, generator=g)
    feats = torch.rand(2, 4, 50, generator=g, requires_grad=True)
    idx = ops.furthest_point_sample(xyz, 7)
    assert idx.dtype == torch.int32 and torch.equal(idx, point_ops.furthest_point_sample(xyz, 7))
    assert torch.equal(ops.gather_points(feats, idx), point_ops.gather_points(feats, idx))
    ball = ops.ball_query(0, 0.3, 5, xyz, centres)                  # (min_radius, max_radius, sample_num, xyz, centres)
    assert ball.shape == (2, 7, 5) and torch.equal(ball, point_ops.ball_query(0.3, 5, xyz, centres))
    grouped = ops.grouping_operation(feats, ball)
    assert grouped.shape == (2, 4, 7, 5)
    dist, nn_idx = ops.three_nn(centres, xyz)                       # (target, source): Euclidean distances
    assert torch.allclose(dist[..., 0], torch.cdist(centres, xyz).min(-1).values, atol=1e-6)
    out = ops.three_interpolate(feats, nn_idx, torch.full((2, 7, 3), 1 / 3))
    out.sum().backward()
    assert out.shape == (2, 4, 7) and feats.grad.abs().sum() > 0
    with pytest.raises(cpu_ops.NoStandIn, match="min_radius=0.1"):
        ops.ball_query(0.1, 0.3, 5, xyz, centres)
    with pytest.raises(cpu_ops.NoStandIn, match="stacked"):
        ops.grouping_operation(feats, ball, torch.tensor([50, 50], dtype=torch.int), torch.tensor([7, 7], dtype=torch.int))


def test_points_in_boxes_all_goes_to_the_cpu_kernel():
    from mmdet3d.structures import DepthInstance3DBoxes

    boxes = DepthInstance3DBoxes(torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.3], [5.0, 5.0, 0.0, 1.0, 1.0, 1.0, 0.0]]))
    pts = torch.tensor([[0.1, 0.1, 0.5], [5.0, 5.0, 0.2], [9.0, 9.0, 9.0]])
    inside = boxes.points_in_boxes_all(pts)                          # (points, boxes), 1 = inside
    assert inside.tolist() == [[1, 0], [0, 1], [0, 0]]
