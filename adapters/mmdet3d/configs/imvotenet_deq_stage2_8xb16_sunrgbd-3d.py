# ImVoteNet stage 2 on SUN RGB-D (mmdetection3d 1.4.0) with DEQ fusion of the per-seed point and image
# features: the whole integration of deqfusion into mmdet3d (docs/mmdet3d.md). Train it with mmdet3d's own
#   python tools/train.py <this file>        or   mim train mmdet3d <this file>
# `./apply_patches.sh mmdet3d` prints the exact paths. The baseline is mmdet3d's config unchanged.

_base_ = ["mmdet3d::imvotenet/imvotenet_stage2_8xb16_sunrgbd-3d.py"]

# Registers DEQFusionVoteHead in mmdet3d's MODELS (and the CPU stand-ins where mmcv has no kernel).
custom_imports = dict(imports=["deqfusion.adapters.mmdet3d.plugin"], allow_failed_imports=False)

model = dict(
    pts_bbox_heads=dict(
        # All three towers: ImVoteNet.loss() reads every loss key of the joint tower from each tower, so
        # the points-only and image-only heads must return loss_deq_jac too (they return 0).
        common=dict(type="DEQFusionVoteHead"),
        joint=dict(
            # ImVoteNet concatenates 256 PointNet++ seed features | 256 image-vote features (after img_mlp);
            # the joint head splits them and fuses them by DEQ fusion to 256 channels before voting.
            deq_fusion=dict(
                channels=(256, 256),
                out_channels=256,
                fusion="deq",       # "concat": pass the 512 through (then out_channels=512 and mmdet3d's widths)
                ablation="full",    # a row of the paper's Tables 6/7
                jac_weight=2.5,     # loss_deq_jac = 0.4 (joint tower weight) * 2.5 * Jacobian term = 1.0 * jac
                options=dict(f_max_iter=55, b_max_iter=56),  # DEQFusion options (deqfusion.FusionConfig)
            ),
            # the joint tower now reads 256 fused channels, like the points-only and image-only towers
            vote_module_cfg=dict(in_channels=256, conv_channels=(256, 256)),
            vote_aggregation_cfg=dict(mlp_channels=[256, 128, 128, 128]),
        ),
    ),
)
