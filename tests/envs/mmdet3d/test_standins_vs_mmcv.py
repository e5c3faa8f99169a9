"""The mmcv._ext stand-in kernels against mmcv 2.1.0's own CPU kernels. Needs the FULL mmcv build (the route
run by hand, docs/mmdet3d.md); the CI venv has mmcv-lite, where these kernels do not exist, so it skips there."""
from __future__ import annotations

import sys

import pytest
import torch

from deqfusion.adapters.mmdet3d import cpu_ops, ext_standin, plugin  # noqa: F401  (plugin: the mmcv._ext decision)

pytestmark = pytest.mark.skipif(
    cpu_ops.ext_is_standin(),
    reason="needs the full mmcv==2.1.0 build (this venv has mmcv-lite, whose _ext is the stand-in itself); "
           "run by hand in a full-route venv as docs/mmdet3d.md says")
torch.set_num_threads(1)


def _ext():
    return sys.modules["mmcv._ext"]


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_equals_mmcv(offset):
    g = torch.Generator().manual_seed(offset)
    xy = torch.rand(500, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(500, 2, generator=g) * 30], 1)
    scores = torch.rand(500, generator=g)
    for thr in (0.3, 0.7):
        ours = ext_standin.nms(boxes, scores, thr, offset)
        theirs = _ext().nms(boxes, scores, iou_threshold=thr, offset=offset)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("aligned,ratio,mode", [(True, 0, 1), (False, 0, 1), (True, 2, 1), (False, 2, 0), (True, 0, 0)])
def test_roi_align_equals_mmcv(aligned, ratio, mode):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 16, 25, 33, generator=g)
    corners = torch.rand(300, 2, generator=g) * torch.tensor([140.0, 110.0]) - 8
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=g).float(), corners,
                      corners + torch.rand(300, 2, generator=g) * 60], 1)
    shape = (300, 16, 7, 7)
    outs = []
    for kernel in (ext_standin.roi_align_forward, _ext().roi_align_forward):
        out = feats.new_zeros(shape)
        am = feats.new_zeros(shape) if mode == 0 else feats.new_zeros(0)
        kernel(feats, rois, out, am, am.clone(), aligned_height=7, aligned_width=7, spatial_scale=0.25,
               sampling_ratio=ratio, pool_mode=mode, aligned=aligned)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_points_in_boxes_equals_mmcv():
    g = torch.Generator().manual_seed(4)
    boxes = torch.cat([torch.rand(20, 3, generator=g) * 6, 0.3 + torch.rand(20, 3, generator=g) * 2,
                       (torch.rand(20, 1, generator=g) - 0.5) * 6.3], 1)
    pts = torch.rand(3000, 3, generator=g) * 7
    ours, theirs = (torch.zeros(20, 3000, dtype=torch.int32) for _ in range(2))
    ext_standin.points_in_boxes_cpu_forward(boxes, pts, ours)
    _ext().points_in_boxes_cpu_forward(boxes, pts, theirs)
    assert torch.equal(ours, theirs) and int(theirs.sum()) > 0
