"""Inside the mmdet3d venv (.ci/envs/mmdet3d.sh; driven by tests/test_mmdet3d_env.py): mmdet3d 1.4.0's own
ImVoteNet, built by mmdet3d's registry from the project config, trained and run on CPU with DEQ fusion.

Inputs are mmdet3d's own detector test inputs (mmdet3d.testing.create_detector_inputs): generated data,
not a result.  One model and one training step (mmengine's train_step) are shared by the tests here.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from deqfusion.adapters.mmdet3d import config_path, runner

torch.set_num_threads(1)
FAST = {"model.pts_bbox_heads.joint.deq_fusion.options": runner.FAST_OPTIONS}


@pytest.fixture(scope="module")
def cfg():
    return runner.load_config(options=FAST)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return runner.build_model(cfg)


@pytest.fixture(scope="module")
def packed():
    return runner.detector_inputs(batch=2)


@pytest.fixture(scope="module")
def step(cfg, model, packed):
    """One step of mmengine's training loop: model.train_step with the config's OptimWrapper (AdamW, grad clip
    10), i.e. forward(mode='loss'), parse_losses, backward, optimiser step; gradients caught by hooks."""
    from mmengine.optim import build_optim_wrapper

    model.train()
    fusion = runner.fusion_of(model)
    grads, hooks = {}, []
    for name, p in fusion.named_parameters():
        hooks.append(p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone())))
    before = {n: p.detach().clone() for n, p in fusion.named_parameters()}
    img_before = next(model.img_backbone.parameters()).detach().clone()
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    log_vars = model.train_step(copy.deepcopy(packed), wrapper)
    for h in hooks:
        h.remove()
    return dict(log_vars={k: float(v) for k, v in log_vars.items()}, stats=fusion.last_stats,
                jac=float(fusion.last_jac_loss), grads=grads, before=before, img_before=img_before)


def test_config_is_the_integration(cfg, model):
    from mmdet3d.models.detectors import ImVoteNet

    from deqfusion import DEQFusion
    from deqfusion.adapters.mmdet3d.head import DEQFusionVoteHead

    assert type(model) is ImVoteNet                                   # mmdet3d's own detector, unchanged
    heads = [model.pts_bbox_head_joint, model.pts_bbox_head_pts, model.pts_bbox_head_img]
    assert all(type(h) is DEQFusionVoteHead for h in heads)
    assert isinstance(model.pts_bbox_head_joint.seed_fusion.deq, DEQFusion)
    assert model.pts_bbox_head_pts.seed_fusion is None and model.pts_bbox_head_img.seed_fusion is None
    assert model.pts_bbox_head_joint.vote_module.in_channels == 256    # fused width, as the config says
    assert cfg.model.pts_bbox_heads.loss_weights == [0.4, 0.3, 0.3]   # inherited from mmdet3d's stage-2 config
    assert str(config_path()).endswith("imvotenet_deq_stage2_8xb16_sunrgbd-3d.py")
    assert runner.train_script().endswith("mmdet3d/.mim/tools/train.py")   # what `runner train` runs


def test_loss_has_deq_jac_summed_into_total(model, step):
    log_vars = step["log_vars"]
    assert "loss_deq_jac" in log_vars and log_vars["loss_deq_jac"] > 0
    # ImVoteNet weights the joint tower by 0.4; the other two towers contribute exactly zero
    expected = 0.4 * model.pts_bbox_head_joint.seed_fusion.settings.jac_weight * step["jac"]
    assert log_vars["loss_deq_jac"] == pytest.approx(expected, rel=1e-5)
    summed = sum(v for k, v in log_vars.items() if k != "loss" and "loss" in k)
    assert log_vars["loss"] == pytest.approx(summed, rel=1e-6)     # parse_losses counted loss_deq_jac
    assert all(math.isfinite(v) for v in log_vars.values())


def test_solver_ran_per_sample_and_gradients_reach_the_fusion(step):
    stats = step["stats"]
    assert stats.nstep.shape == (2,) and int(stats.nstep.min()) >= 1       # one solve per scene
    assert stats.status.shape == (2,) and sum(stats.counts().values()) == 2
    assert stats.backward is not None and int(stats.backward.nstep.min()) >= 1  # the implicit backward ran
    for key in ("deq_nstep", "deq_rel_residual", "deq_converged"):          # logged by mmengine
        assert key in step["log_vars"]
    assert step["log_vars"]["deq_nstep"] == pytest.approx(float(stats.nstep.float().mean()))
    grads = step["grads"]
    assert set(grads) == set(step["before"]), "some DEQ fusion parameters got no gradient"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_optimiser_step_moves_the_fusion_not_the_frozen_2d_branch(model, step):
    fusion = runner.fusion_of(model)
    moved = [n for n, p in fusion.named_parameters() if not torch.equal(step["before"][n], p.detach())]
    assert moved, "the optimiser step left every DEQ fusion parameter unchanged"
    assert torch.equal(step["img_before"], next(model.img_backbone.parameters()).detach())  # freeze_img_branch


def test_predict_runs_the_fusion(model, packed):
    model.eval()
    fusion = runner.fusion_of(model)
    fusion.last_stats = None
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode="predict")
    assert len(results) == 2
    for r in results:
        inst = r.pred_instances_3d
        assert inst.bboxes_3d.tensor.shape[-1] == 7 and len(inst.scores_3d) == len(inst.labels_3d)
    assert fusion.last_stats is not None and fusion.last_stats.nstep.shape == (2,)
    assert fusion.last_jac_loss is None                                    # no Jacobian term in eval


def test_the_keyerror_trap_is_real(cfg, packed):
    """Why the config makes all three towers DEQFusionVoteHead: with only the joint one, mmdet3d's ImVoteNet.loss
    indexes the points-only tower's losses with the joint tower's 'loss_deq_jac' and fails."""
    joint_only = copy.deepcopy(cfg)
    joint_only.model.pts_bbox_heads.common.type = "VoteHead"
    joint_only.model.pts_bbox_heads.joint.type = "DEQFusionVoteHead"
    model = runner.build_model(joint_only)
    model.train()
    with pytest.raises(KeyError, match="loss_deq_jac"):
        model(**model.data_preprocessor(runner.detector_inputs(batch=1), True), mode="loss")


def test_head_checks_the_fused_width_against_its_vote_module(cfg):
    from mmdet3d.registry import MODELS

    from deqfusion.adapters.common.settings import SettingsError

    heads = cfg.model.pts_bbox_heads
    joint = copy.deepcopy(heads.common)
    joint.update(copy.deepcopy(heads.joint), test_cfg=cfg.model.test_cfg.pts)
    joint.vote_module_cfg.in_channels = 512                           # mmdet3d's width, not the fused 256
    with pytest.raises(SettingsError, match="out_channels=256 but this head's vote_module_cfg.in_channels=512"):
        MODELS.build(joint)
    joint.vote_module_cfg.in_channels = 256
    joint.deq_fusion = dict(joint.deq_fusion, fusion="concat")        # concat keeps 512: says what to change
    with pytest.raises(SettingsError, match="out_channels=512"):
        MODELS.build(joint)
