"""The mmdet3d plugin's light parts, in the main environment (no mmdet3d here): settings, the seed-feature fusion,
the project config's text, the version check behind `apply mmdet3d`, and the mmcv._ext stand-in kernels
against brute-force references. The model itself runs in tests/envs/mmdet3d (tests/test_mmdet3d_env.py)."""
from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import deqfusion.adapters.mmdet3d as m3
from deqfusion.adapters.common.settings import SettingsError
from deqfusion.adapters.mmdet3d import ext_standin
from deqfusion.adapters.mmdet3d.fusion import SeedFeatureFusion, settings_from_config

GOOD = {"mmdet3d": "1.4.0", "mmcv": "2.1.0", "mmengine": "0.10.7", "mmdet": "3.2.0", "numpy": "1.26.4",
        "setuptools": "80.9.0", "mmcv-lite": None}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra threads only contend on a loaded machine (restored after this module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config_assignments():
    tree = ast.parse(m3.config_path().read_text())
    return {t.id: ast.literal_eval(node.value) if not isinstance(node.value, ast.Call) else node.value
            for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}


def _call_to_dict(node):
    """dict(...) calls of the config file -> plain dicts (the config is pure literals)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict":
        return {kw.arg: _call_to_dict(kw.value) for kw in node.keywords}
    return ast.literal_eval(node)


# -- settings --------------------------------------------------------------------------------------

def test_settings_are_the_common_mechanism(monkeypatch):
    assert m3.Settings.upstream == "mmdet3d" and m3.Settings.env_prefix() == "DEQFUSION_MMDET3D_"
    assert m3.Settings().jac_weight == 2.5 and m3.Settings().is_deq
    monkeypatch.setenv("DEQFUSION_MMDET3D_JAC_WEIGHT", "0.5")
    assert m3.current_settings().jac_weight == 0.5
    with m3.configure(jac_weight=2.0):
        assert m3.current_settings().jac_weight == 2.0
    monkeypatch.setenv("DEQFUSION_MMDET3D_JACWEIGHT", "1")
    with pytest.raises(SettingsError, match="DEQFUSION_MMDET3D_JAC_WEIGHT"):
        m3.current_settings()


def test_config_dict_overrides_the_current_settings_and_is_validated():
    with m3.configure(jac_weight=3.0, options={"f_max_iter": 7}):
        s = settings_from_config({"channels": (256, 256), "out_channels": 256, "options": {"f_tol": 1e-4}})
        assert s.jac_weight == 3.0 and s.options == {"f_tol": 1e-4}   # config's options replace, fields merge
    with pytest.raises(SettingsError, match="unknown key 'jac_wieght'"):
        settings_from_config({"jac_wieght": 1.0})
    with pytest.raises(SettingsError, match="f_max_iter"):            # a misspelled DEQFusion option
        settings_from_config({"options": {"f_max_iters": 5}})
    with pytest.raises(SettingsError, match="fusion must be one of"):
        settings_from_config({"fusion": "sum"})


# -- the fusion the joint head runs ----------------------------------------------------------------

def _seed_features(batch=2, seeds=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, seeds, generator=g, dtype=torch.float64)


def test_seed_fusion_splits_fuses_and_weights_the_jacobian_term():
    torch.manual_seed(0)
    s = m3.Settings(jac_weight=0.25, options={"f_max_iter": 12})
    fusion = SeedFeatureFusion((32, 32), 32, s).double().train()
    x = _seed_features().requires_grad_()
    fused, jac = fusion(x)
    assert fused.shape == (2, 32, 16) and torch.isfinite(fused).all()
    assert float(jac) == pytest.approx(0.25 * float(fusion.last_jac_loss)) and float(jac) > 0
    assert fusion.last_stats.nstep.shape == (2,)                       # per scene
    (fused.square().mean() + jac).backward()
    assert x.grad[:, :32].abs().sum() > 0 and x.grad[:, 32:].abs().sum() > 0   # both modalities matter
    assert set(fusion.log_values(fused)) == {"deq_nstep", "deq_rel_residual", "deq_converged"}
    fusion.eval()
    with torch.no_grad():
        _, jac_eval = fusion(x)
    assert float(jac_eval) == 0.0 and fusion.last_jac_loss is None


def test_seed_fusion_projects_unequal_widths_and_checks_the_input():
    fusion = SeedFeatureFusion((48, 16), 32, m3.Settings(options={"f_max_iter": 5})).double()
    assert fusion.deq.in_dims == (48, 16)
    assert fusion(_seed_features())[0].shape == (2, 32, 16)
    with pytest.raises(ValueError, match=r"\(B, 64, N\).*deq_fusion.channels"):
        fusion(torch.zeros(2, 63, 16, dtype=torch.float64))
    with pytest.raises(SettingsError, match="channels=.*not options.in_dims"):
        SeedFeatureFusion((32, 32), 32, m3.Settings(options={"in_dims": (32, 32)}))


def test_concat_baseline_passes_through_and_needs_the_full_width():
    x = _seed_features()
    fusion = SeedFeatureFusion((32, 32), 64, m3.Settings(fusion="concat"))
    out, jac = fusion(x)
    assert out is x and float(jac) == 0.0 and fusion.deq is None and not list(fusion.parameters())
    with pytest.raises(SettingsError, match="out_channels=64"):
        SeedFeatureFusion((32, 32), 32, m3.Settings(fusion="concat"))


# -- the project config ----------------------------------------------------------------------------

def test_project_config_inherits_mmdet3d_and_names_this_package():
    cfg = _config_assignments()
    assert cfg["_base_"] == ["mmdet3d::" + m3.BASE_CONFIG]
    imports = _call_to_dict(cfg["custom_imports"])
    assert imports == {"imports": ["deqfusion.adapters.mmdet3d.plugin"], "allow_failed_imports": False}
    assert importlib.util.find_spec(imports["imports"][0]) is not None
    heads = _call_to_dict(cfg["model"])["pts_bbox_heads"]
    assert heads["common"] == {"type": "DEQFusionVoteHead"}              # all three towers (the KeyError trap)
    joint = heads["joint"]
    fusion = joint["deq_fusion"]
    settings = settings_from_config(fusion, base=m3.Settings())
    assert settings.is_deq and settings.jac_weight == 2.5 and settings.options["f_max_iter"] == 55
    out = fusion["out_channels"]
    assert sum(fusion["channels"]) == 512                                # what ImVoteNet concatenates
    assert joint["vote_module_cfg"]["in_channels"] == out and joint["vote_aggregation_cfg"]["mlp_channels"][0] == out
    assert "pts" not in heads and "img" not in heads                     # the single-modality towers keep mmdet3d's


def test_setup_ships_the_config_and_pins_the_extra():
    setup = (m3.config_path().parents[3] / "setup.py").read_text()
    assert '"deqfusion.adapters.mmdet3d": ["configs/*.py"]' in setup
    for pin in ('"mmdet3d==1.4.0"', '"mmcv==2.1.0"', '"mmengine>=0.8.0,<1.0"', '"mmdet>=3.0.0,<3.3"', '"numpy<2"',
                '"setuptools<81"'):
        assert pin in setup, pin


# -- apply mmdet3d: versions and instructions -----------------------------------------------------

@pytest.mark.parametrize("version,spec,ok", [
    ("1.4.0", "==1.4.0", True), ("1.4", "==1.4.0", True), ("1.4.1", "==1.4.0", False),
    ("0.10.7", ">=0.8.0,<1.0.0", True), ("1.0.0", ">=0.8.0,<1.0.0", False), ("0.7.4", ">=0.8.0,<1.0.0", False),
    ("3.2.0", ">=3.0.0,<3.3.0", True), ("3.3.0", ">=3.0.0,<3.3.0", False), ("1.26.4", "<2", True),
    ("2.0.1", "<2", False), ("2.1.0+cu121", "==2.1.0", True),
])
def test_satisfies(version, spec, ok):
    assert m3.satisfies(version, spec) is ok


def test_instructions_with_the_pinned_stack():
    lines = m3.plugin_instructions(GOOD)
    text = "\n".join(lines)
    assert m3.version_problems(GOOD) == [] and "problem" not in text and "all match the pins" in text
    config = str(m3.config_path())
    assert f"config: {config}" in text
    assert any(line.strip().startswith("train: python ") and line.rstrip().endswith(f"train.py {config}") for line in lines)
    assert f"mim train mmdet3d {config}" in text and "imvotenet_stage2_8xb16_sunrgbd-3d.py" in text


@pytest.mark.parametrize("change,needle", [
    ({"mmcv": "2.2.0"}, "mmcv 2.2.0 is installed; the plugin needs mmcv==2.1.0"),
    ({"mmcv": None, "mmcv-lite": "2.1.0"}, "mmcv-lite 2.1.0 has no compiled ops"),
    ({"mmcv": None}, "mmcv is not installed"),
    ({"mmdet": "3.3.0"}, "mmdet 3.3.0 is installed; the plugin needs mmdet>=3.0.0,<3.3.0"),
    ({"mmengine": "1.0.0"}, "mmengine 1.0.0 is installed"),
    ({"numpy": "2.1.3"}, "numpy 2.1.3 is installed; the plugin needs numpy<2"),
    ({"mmdet3d": None}, "mmdet3d is not installed"),
    ({"setuptools": "84.2.1"}, "setuptools 84.2.1 is installed; the plugin needs setuptools<81"),
])
def test_instructions_name_each_off_pin_package_and_the_fix(change, needle):
    versions = dict(GOOD, **change)
    problems = m3.version_problems(versions)
    assert len(problems) == 1 and needle in problems[0]
    assert "pip install" in problems[0]
    assert f"  problem: {problems[0]}" in m3.plugin_instructions(versions)


def test_module_command_prints_the_config_path_or_the_instructions(capsys, monkeypatch):
    from deqfusion.adapters.mmdet3d.__main__ import main

    import deqfusion.adapters.mmdet3d.__main__ as cli

    assert main(["--config"]) == 0 and capsys.readouterr().out.strip() == str(m3.config_path())

    monkeypatch.setattr(cli, "plugin_instructions", lambda: m3.plugin_instructions(GOOD))
    monkeypatch.setattr(cli, "version_problems", lambda: m3.version_problems(GOOD))
    assert main([]) == 0 and "mim train mmdet3d" in capsys.readouterr().out
    monkeypatch.setattr(cli, "version_problems", lambda: ["x"])
    assert main([]) == 1


def test_instructions_read_the_installed_versions_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(m3, "installed_versions", lambda: seen.setdefault("v", dict(GOOD, mmdet="2.28.0")))
    assert any("mmdet 2.28.0" in line for line in m3.plugin_instructions())


# -- the mmcv._ext stand-in kernels ---------------------------------------------------------------

def test_ext_module_answers_every_name_and_missing_kernels_name_the_fix():
    mod = ext_standin.make_module()
    assert all(hasattr(mod, n) for n in ("nms", "roi_align_forward", "ball_query_forward", "anything_else"))
    assert mod.nms is ext_standin.nms
    assert mod.__spec__.name == "mmcv._ext" and mod.__spec__.loader is None   # mmengine: "mmcv-full" not available
    with pytest.raises(ext_standin.StandInMissing, match="mmcv._ext.deform_conv_forward.*full mmcv==2.1.0"):
        mod.deform_conv_forward()
    with pytest.raises(AttributeError):
        mod.__path__  # noqa: B018  (not a package: submodule imports must fail normally)


def _naive_nms(boxes, scores, thr, offset):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep, dead = [], set()
    for a, i in enumerate(order):
        if i in dead:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1 + offset) * max(0.0, yy2 - yy1 + offset)
            area = [(b[2] - b[0] + offset) * (b[3] - b[1] + offset) for b in (boxes[i], boxes[j])]
            if inter / (area[0] + area[1] - inter) > thr:
                dead.add(j)
    return keep


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_matches_greedy_reference(offset):
    g = torch.Generator().manual_seed(offset)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], 1)
    scores = torch.randperm(60, generator=g).float() / 60   # distinct scores: the order is unambiguous
    for thr in (0.1, 0.5, 0.8):
        got = ext_standin.nms(boxes, scores, thr, offset).tolist()
        assert got == _naive_nms(boxes.tolist(), scores.tolist(), thr, offset)
        assert 0 < len(got) <= 60
    assert ext_standin.nms(boxes[:0], scores[:0], 0.5).numel() == 0


def _bilinear(img, y, x):
    """One sample of RoIAlign (C, H, W) -> (C,), with the kernel's border rules, written as a plain loop body."""
    _, h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(img.shape[0], dtype=img.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1]
            + ly * (1 - lx) * img[:, y1, x0] + ly * lx * img[:, y1, x1])


def _naive_roi_align(feats, rois, ph, pw, scale, ratio, mode, aligned):
    out = torch.zeros(len(rois), feats.shape[1], ph, pw, dtype=feats.dtype)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        off = 0.5 if aligned else 0.0
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else math.ceil(rh / ph)
        gw = ratio if ratio > 0 else math.ceil(rw / pw)
        for i in range(ph):
            for j in range(pw):
                vals = [_bilinear(feats[int(b)], sy + i * rh / ph + (a + 0.5) * rh / ph / gh,
                                  sx + j * rw / pw + (c + 0.5) * rw / pw / gw)
                        for a in range(gh) for c in range(gw)]
                if mode == 1:
                    out[r, :, i, j] = sum(vals) / max(gh * gw, 1) if vals else 0
                else:
                    out[r, :, i, j] = torch.stack(vals).amax(0).clamp(min=-10000.0) if vals else -10000.0
    return out


@pytest.mark.parametrize("aligned,ratio,mode", [(True, 0, 1), (False, 0, 1), (True, 2, 1), (True, 0, 0)])
def test_roi_align_matches_the_sample_by_sample_reference(aligned, ratio, mode):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    corners = torch.rand(12, 2, generator=g, dtype=torch.float64) * torch.tensor([40.0, 34.0]) - 4  # some off-map
    size = torch.rand(12, 2, generator=g, dtype=torch.float64) * 20
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).double(), corners, corners + size], 1)
    rois[0, 3:] = rois[0, 1:3]                                              # an empty box
    scale, ph, pw = 0.25, 3, 2
    out = torch.zeros(12, 3, ph, pw, dtype=torch.float64)
    argmax = torch.zeros_like(out) if mode == 0 else out.new_zeros(0)
    ext_standin.roi_align_forward(feats, rois, out, argmax, argmax.clone(), aligned_height=ph, aligned_width=pw,
                                  spatial_scale=scale, sampling_ratio=ratio, pool_mode=mode, aligned=aligned)
    ref = _naive_roi_align(feats, rois, ph, pw, scale, ratio, mode, aligned)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out.abs().sum() > 0


def test_points_in_boxes_matches_the_per_point_reference():
    g = torch.Generator().manual_seed(2)
    boxes = torch.cat([torch.rand(5, 3, generator=g) * 4, 0.5 + torch.rand(5, 3, generator=g) * 2,
                       (torch.rand(5, 1, generator=g) - 0.5) * 6], 1)
    pts = torch.rand(400, 3, generator=g) * 5
    got = torch.zeros(5, 400, dtype=torch.int32)
    ext_standin.points_in_boxes_cpu_forward(boxes, pts, got)
    ref = np.zeros((5, 400), dtype=np.int32)
    for t, (cx, cy, cz, sx, sy, sz, rz) in enumerate(boxes.tolist()):
        for p, (x, y, z) in enumerate(pts.tolist()):
            if abs(z - (cz + sz / 2)) > sz / 2:
                continue
            c, s = math.cos(-rz), math.sin(-rz)
            lx, ly = (x - cx) * c - (y - cy) * s, (x - cx) * s + (y - cy) * c
            ref[t, p] = int(-sx / 2 < lx < sx / 2 and -sy / 2 < ly < sy / 2)
    assert (got.numpy() == ref).all() and 0 < ref.sum() < ref.size


def test_apply_mmdet3d_prints_the_plugin_instructions_instead_of_refusing(capsys):
    """`./apply_patches.sh mmdet3d` (pip + plugin route): versions against the pins, the config, the command."""
    from deqfusion.upstream.cli import main
    from deqfusion.adapters import mmdet3d as adapter

    code = main(["apply", "mmdet3d"])
    out = capsys.readouterr().out
    assert code == (1 if adapter.version_problems() else 0)
    assert "nothing to clone or patch" in out.splitlines()[0]
    config = adapter.config_path()
    assert f"train: python tools/train.py {config}" in out and Path(config).is_file()
