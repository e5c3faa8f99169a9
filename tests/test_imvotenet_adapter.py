"""The ImVoteNet adapter without the upstream: settings, the fusion call, the loss wrapper, the
run-time shims (PointNet++ stand-in, legacy CUDA constructors), the SUN RGB-D generator and check,
the workspace, log parsing and the reproduce command's table and errors."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from deqfusion.adapters import imvotenet as A
from deqfusion.adapters.common import point_ops
from deqfusion.adapters.common.settings import SettingsError
from deqfusion.adapters.imvotenet import data as D
from deqfusion.adapters.imvotenet import reproduce as P
from deqfusion.adapters.imvotenet import runner as R
from deqfusion.adapters.imvotenet import shims as S

SMALL = {"f_max_iter": 4, "b_max_iter": 4}


def _features(b=2, n=32, c=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, n, generator=g), torch.randn(b, c, n, generator=g).relu()


# ---------------------------------------------------------------- settings and the fusion call
def test_settings_defaults_and_environment(monkeypatch):
    s = A.Settings()
    assert s.fusion == "deq" and s.jac_weight == A.DEFAULT_JAC_WEIGHT == 1.0
    monkeypatch.setenv("DEQFUSION_IMVOTENET_FUSION", "concat")
    assert not A.current_settings().is_deq
    monkeypatch.setenv("DEQFUSION_IMVOTENET_FUSION", "deq")
    monkeypatch.setenv("DEQFUSION_IMVOTENET_OPTIONS", "f_max_iter=7")
    monkeypatch.setenv("DEQFUSION_IMVOTENET_JAC_WEIGHT", "0.5")
    cur = A.current_settings()
    assert cur.options == {"f_max_iter": 7} and cur.jac_weight == 0.5
    monkeypatch.setenv("DEQFUSION_IMVOTENET_JAC_WIEGHT", "1")
    with pytest.raises(SettingsError, match="JAC_WIEGHT"):
        A.current_settings()
    with pytest.raises(SettingsError, match="f_max_iter"):
        A.Settings(options={"f_thres": 3})
    assert A.Settings(jac_weight=0).fusion_kwargs()["jac_reg"] is False  # a weight-0 term is not estimated


def test_settings_survive_the_trip_through_the_environment(monkeypatch):
    s = A.Settings(fusion="deq", ablation="no_gate", jac_weight=0.25, options={"f_max_iter": 9, "f_tol": 1e-4})
    for key, value in R.settings_env(s).items():
        monkeypatch.setenv(key, value)
    assert A.current_settings() == s


def test_concat_is_the_upstream_concatenation():
    pc, img = _features()
    with A.configure(fusion="concat"):
        assert A.build_fusion(256, 256) is None and A.fused_width(256, 256) == 512
    ep = {}
    assert torch.equal(A.fuse(None, pc, img, ep), torch.cat((pc, img), 1)) and ep == {}


def test_deq_fusion_keeps_the_seed_axis_and_records_per_scene_stats():
    pc, img = _features(b=3, n=40)
    with A.configure(fusion="deq", options=SMALL):
        assert A.fused_width(256, 256) == 256
        fusion = A.build_fusion(256, 256)
    assert fusion in A.live_fusions()
    ep = {}
    out = A.fuse(fusion, pc, img, ep)
    assert out.shape == (3, 256, 40)
    assert ep["deq_jac_loss"].dim() == 0 and ep["deq_jac_loss"].requires_grad
    for key in ("deq_nstep", "deq_abs_residual", "deq_rel_residual", "deq_status"):
        assert ep[key].shape == (3,)
    assert int(ep["deq_nstep"].max()) <= SMALL["f_max_iter"]
    (out.square().mean() + ep["deq_jac_loss"]).backward()
    grads = [p.grad for p in fusion.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert fusion.last_stats.backward is not None  # the adjoint solve ran


def test_wrap_loss_adds_the_weighted_jacobian_term(caplog):
    def get_loss(end_points, config, prefixes, weights):
        end_points["loss"] = torch.tensor(2.0, requires_grad=True) * 1
        end_points["pc_img_loss"] = torch.tensor(3.0)
        return end_points["loss"], end_points

    ep = {"deq_jac_loss": torch.tensor([0.5, 1.5]), "deq_nstep": torch.tensor([3, 4]),  # DataParallel: 2 replicas
          "deq_abs_residual": torch.tensor([0.1, 0.2]), "deq_rel_residual": torch.tensor([1e-3, 2e-3]),
          "deq_status": torch.tensor([0, 1])}
    wrapped = A.wrap_loss(get_loss, A.Settings(jac_weight=0.5))
    with caplog.at_level(logging.INFO, logger=A.log.name):
        loss, ep = wrapped(ep, None, ["pc_img_"], {})
    assert float(loss.detach()) == pytest.approx(2.0 + 0.5 * 1.0) and ep["loss"] is loss
    assert ep["deq_jac_loss"].dim() == 0 and float(ep["deq_jac_loss"]) == 1.0  # .item() works in train.py's loop
    assert float(ep["deq_converged_ratio"]) == 0.5
    records = {r.getMessage().split(" ", 2)[1]: json.loads(r.getMessage().split(" ", 2)[2]) for r in caplog.records}
    assert records["forward"]["status"] == ["converged", "max_iter"] and records["forward"]["nstep"] == [3, 4]
    assert records["forward"]["training"] is True
    assert records["loss"]["towers"] == {"pc_img_loss": 3.0} and records["loss"]["training"] is True
    # concatenation: the upstream's loss, untouched
    loss2, ep2 = A.wrap_loss(get_loss)({}, None, ["pc_img_"], {})
    assert float(loss2.detach()) == 2.0 and "deq_converged_ratio" not in ep2


# ---------------------------------------------------------------- run-time shims
def _clouds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 300, 3, generator=g, dtype=torch.float64), torch.rand(2, 40, 3, generator=g, dtype=torch.float64)


def test_pointnet2_ext_stand_in_has_the_bindings_names_and_argument_orders():
    ext = S.pointnet2_ext()
    assert all(callable(getattr(ext, name)) for name in S.EXT_FUNCTIONS) and ext.__deqfusion_stand_in__
    xyz, centres = _clouds()
    # ball_query(new_xyz, xyz, radius, nsample) in the binding; (radius, nsample, xyz, new_xyz) in point_ops
    assert torch.equal(ext.ball_query(centres, xyz, 0.2, 8), point_ops.ball_query(0.2, 8, xyz, centres))
    dist2, idx = ext.three_nn(centres, xyz)  # the kernel returns squared distances
    d, i = point_ops.three_nn(centres, xyz)
    assert torch.equal(idx, i) and torch.allclose(dist2.sqrt(), d)
    assert torch.equal(ext.furthest_point_sampling(xyz, 10), point_ops.furthest_point_sample(xyz, 10))


@pytest.mark.parametrize("op", ["gather_points", "group_points", "three_interpolate"])
def test_pointnet2_ext_gradients_are_the_adjoints_of_the_forward_ops(op):
    ext = S.pointnet2_ext()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    if op == "gather_points":
        args = (torch.randint(0, 12, (2, 9), generator=g, dtype=torch.int32),)
        grad_fn = lambda go: ext.gather_points_grad(go, args[0], 12)  # noqa: E731
    elif op == "group_points":
        args = (torch.randint(0, 12, (2, 4, 3), generator=g, dtype=torch.int32),)
        grad_fn = lambda go: ext.group_points_grad(go, args[0], 12)  # noqa: E731
    else:
        args = (torch.randint(0, 12, (2, 7, 3), generator=g, dtype=torch.int32), torch.rand(2, 7, 3, generator=g,
                                                                                          dtype=torch.float64))
        grad_fn = lambda go: ext.three_interpolate_grad(go, args[0], args[1], 12)  # noqa: E731
    out = getattr(ext, op)(feats, *args)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(out, feats, grad_out)
    with torch.no_grad():  # the upstream calls them inside autograd.Function.backward
        got = grad_fn(grad_out)
    assert torch.allclose(got, want)


def test_install_pointnet2_ext_restores_sys_modules():
    assert "pointnet2._ext" not in sys.modules
    with S.install_pointnet2_ext() as mod:
        assert sys.modules["pointnet2._ext"] is mod
    assert "pointnet2._ext" not in sys.modules


def test_legacy_cuda_tensor_constructors_build_cpu_tensors():
    original = torch.cuda.FloatTensor
    with S.legacy_cuda_tensors("cpu"):
        t = torch.cuda.FloatTensor(2, 3, 4).zero_()
        assert t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == (2, 3, 4)
        assert torch.cuda.LongTensor(3).dtype == torch.int64
    assert torch.cuda.FloatTensor is original


# ---------------------------------------------------------------- SUN RGB-D layout
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return D.generate(tmp_path_factory.mktemp("sunrgbd"), D.GenSpec(train=3, val=2, width=48, height=36))


def test_generator_writes_the_datasets_exact_layout(generated):
    assert D.check_data(generated) == {"train": 3, "val": 2}
    names = D.scan_names(generated, "train")
    assert names == ["005051", "005052", "005053"] and D.scan_names(generated, "val") == ["000001", "000002"]
    folder = D.pc_dir(generated, "train")
    with np.load(folder / "005051_pc.npz") as z:
        assert list(z.keys()) == ["pc"]
        pc = z["pc"]
    assert pc.dtype == np.float64 and pc.shape == (48 * 36, 6) and 0 <= pc[:, 3:].min() and pc[:, 3:].max() <= 1
    boxes = np.load(folder / "005051_bbox.npy")
    assert boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 8 and len(boxes) >= 1
    assert set(boxes[:, 7].astype(int)) <= set(range(10)) and (boxes[:, 3:6] > 0).all()
    with np.load(folder / "005051_votes.npz") as z:
        assert list(z.keys()) == ["point_votes"]
        votes = z["point_votes"]
    assert votes.dtype == np.float64 and votes.shape == (len(pc), 10) and set(np.unique(votes[:, 0])) == {0.0, 1.0}
    raw = D.raw_dir(generated)
    assert (raw / "train_data_idx.txt").read_text().split() == ["5051", "5052", "5053"]
    lines = (raw / "calib" / "005051.txt").read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split(" ")) == 9 for line in lines)
    for line in (D.box2d_dir(generated, "train") / "005051.txt").read_text().splitlines():
        f = line.split(" ")
        assert f[0] in D.CLASSES and 0 <= float(f[4]) <= float(f[6]) < 48 and 0 <= float(f[5]) <= float(f[7]) < 36
        assert 0 < float(f[-1]) < 1
    from PIL import Image

    assert Image.open(raw / "image" / "005051.jpg").size == (48, 36)


def test_generated_points_project_into_the_image_and_votes_reach_box_centres(generated):
    """Every point projects (ImVoteNet's projection) onto a pixel of its image, and every in-box
    point's first vote ends at a box centre: the seeds can read image votes, the votes are learnable."""
    for name in D.scan_names(generated, "train"):
        pc = np.load(D.pc_dir(generated, "train") / f"{name}_pc.npz")["pc"]
        votes = np.load(D.pc_dir(generated, "train") / f"{name}_votes.npz")["point_votes"]
        boxes = np.load(D.pc_dir(generated, "train") / f"{name}_bbox.npy")
        lines = (D.raw_dir(generated) / "calib" / f"{name}.txt").read_text().splitlines()
        rtilt = np.reshape([float(x) for x in lines[0].split(" ")], (3, 3), "F")
        k = np.reshape([float(x) for x in lines[1].split(" ")], (3, 3), "F")
        uv = np.rint(D._project(pc[:, :3], rtilt, k))
        assert (uv >= 0).all() and (uv[:, 0] < 48).all() and (uv[:, 1] < 36).all()
        assert len(np.unique(uv, axis=0)) == len(pc)  # one point per pixel, as a depth image gives
        inside = votes[:, 0] == 1
        assert inside.any()
        ends = pc[inside, :3] + votes[inside, 1:4]
        dist = np.linalg.norm(ends[:, None, :] - boxes[None, :, :3], axis=2).min(1)
        assert dist.max() < 1e-9


def test_check_data_names_the_missing_file_and_how_to_prepare(generated, tmp_path):
    import shutil

    copy = tmp_path / "sunrgbd"
    shutil.copytree(generated, copy)
    (D.raw_dir(copy) / "image" / "000002.jpg").unlink()
    with pytest.raises(D.DataError, match=r"000002\.jpg.*sunrgbd_data\.py --gen_v1_data.*--generated"):
        D.check_data(copy)
    shutil.rmtree(D.pc_dir(copy, "val"))
    with pytest.raises(D.DataError, match=r"sunrgbd_pc_bbox_votes_50k_v1_val/"):
        D.check_data(copy)
    with pytest.raises(D.DataError, match="no SUN RGB-D found"):
        D.resolve_data_root(None, tmp_path / "no-clone")
    with pytest.raises(ValueError, match="buffers"):
        D.GenSpec(width=1000, height=1000)


def test_workspace_links_the_clone_and_the_data(generated, tmp_path):
    clone = tmp_path / "clone"
    (clone / "models").mkdir(parents=True)
    (clone / "sunrgbd").mkdir()
    (clone / "train.py").write_text("")
    (clone / "sunrgbd" / "sunrgbd_detection_dataset.py").write_text("")
    ws = R.make_workspace(clone, generated, tmp_path / "work")
    assert (ws / "train.py").resolve() == (clone / "train.py").resolve() and (ws / "models").is_symlink()
    assert (ws / "sunrgbd" / "sunrgbd_detection_dataset.py").is_symlink()
    assert (ws / "sunrgbd" / "sunrgbd_pc_bbox_votes_50k_v1_train").resolve() == D.pc_dir(generated, "train").resolve()
    assert R.make_workspace(clone, generated, tmp_path / "work") == ws  # reusable
    assert not any(p.name == "__pycache__" for p in clone.rglob("*"))


def test_parse_eval_log_blocks():
    text = "eval mean loss: 3.0\neval bed Average Precision: 0.5\neval mAP: 0.25\neval AR: 0.5\n" \
           "eval bed Average Precision: 0.7\neval mAP: 0.125\neval AR: nan\n"
    blocks = R.parse_eval_log(text)
    assert [b["mAP"] for b in blocks] == [0.25, 0.125] and "mean loss" not in blocks[0]


# ---------------------------------------------------------------- reproduce imvotenet
def test_reproduce_table_labels_every_generated_number():
    results = {"concat": {"maps": {"mAP@0.25": 1.5, "mAP@0.5": 0.25}},
               "deq": {"maps": {"mAP@0.25": 2.0, "mAP@0.5": 0.5},
                       "deq": {"iterations": 2, "nstep_mean": 4.0, "rel_residual_max": 0.3, "status": {"max_iter": 4}}}}
    text = P.render_table(results, generated=True, what="2 scenes")
    rows = [line for line in text.splitlines() if line.startswith("| ImVoteNet")]
    assert len(rows) == 2
    for row in rows:
        cells = row.strip("|").split("|")
        assert all("generated data, not a result" in c for c in cells[1:3])  # ours
        assert all("generated" not in c for c in cells[3:])  # the paper's
    assert "| 61.9 | 45.6 |" in text and "| 62.7 | 46.4 |" in text
    real = P.render_table(results, generated=False, what="SUN RGB-D")
    assert "not a result" not in real and "1.50" in real


def test_reproduce_without_data_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from deqfusion.cli import main

    clone = tmp_path / "imvotenet"
    for rel in ("train.py", "eval.py", "sunrgbd/sunrgbd_detection_dataset.py"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        (clone / rel).write_text("")
    (clone / "models" / "imvotenet.py").parent.mkdir(parents=True, exist_ok=True)
    (clone / "models" / "imvotenet.py").write_text("from deqfusion.adapters import imvotenet as deq_adapter\n")
    monkeypatch.delenv(D.ENV_DATA, raising=False)
    monkeypatch.delenv("DEQFUSION_DATA", raising=False)
    code = main(["reproduce", "imvotenet", "--upstream", str(clone), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no SUN RGB-D found" in err and "--generated" in err and "Traceback" not in err
    code = main(["reproduce", "imvotenet", "--upstream", str(clone), "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "sunrgbd_pc_bbox_votes_50k_v1_train/" in err
    (clone / "models" / "imvotenet.py").write_text("")
    code = main(["reproduce", "imvotenet", "--generated", "--upstream", str(clone), "--out", str(tmp_path / "out")])
    assert code == 2 and "not patched" in capsys.readouterr().err
