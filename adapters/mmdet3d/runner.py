"""Drive mmdet3d's ImVoteNet with the project config: build it with mmdet3d's registry, run it on CPU.

``python -m deqfusion.adapters.mmdet3d.runner`` is the CPU check the instructions print: it loads the
project config exactly as ``tools/train.py`` does (``Config.fromfile``, which imports the config's
``custom_imports``), builds the model with ``mmdet3d.registry.MODELS``, and runs ``loss`` + backward and
``predict`` on mmdet3d's own detector test inputs (``mmdet3d.testing.create_detector_inputs``: random
points, image, depth boxes; generated data, not a result).

``... runner train [tools/train.py arguments]`` runs mmdet3d's own ``tools/train.py`` (the wheel's copy)
unchanged, after installing the CPU stand-ins (:func:`cpu_ops.install`): ``tools/train.py`` imports
``mmcv.ops`` before it reads the config, so under mmcv-lite the config's ``custom_imports`` comes too late,
and a config without the plugin (mmdet3d's own, the baseline) gets the point-op stand-ins this way too.
For CUDA tensors with the full mmcv the stand-ins hand over to mmcv's kernels, so on a GPU this is the
same as calling ``tools/train.py`` directly.
"""
from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..common.report import GENERATED
from . import config_path

NUM_CLASSES = 10  # SUN RGB-D's 10 classes, as the stage-2 config
FAST_OPTIONS = {"f_max_iter": 8, "b_max_iter": 8}  # a CPU check, not the config's 55/56 steps


def load_config(config: Optional[str] = None, options: Optional[Dict[str, Any]] = None):
    """The project config (or ``config``) through mmengine, with ``options`` merged in (like ``--cfg-options``)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config or config_path()))
    if options:
        cfg.merge_from_dict(dict(options))
    return cfg


def build_model(cfg):
    """``cfg.model`` built by mmdet3d's MODELS registry (the default scope of mmdet3d's configs)."""
    from mmdet3d.registry import MODELS

    return MODELS.build(cfg.model)


def detector_inputs(batch: int = 2, num_points: int = 2000, img_size: int = 128, num_gt: int = 3,
                    seed: int = 0) -> Dict[str, List[Any]]:
    """``batch`` samples of mmdet3d's ``create_detector_inputs`` (depth boxes, image), merged into one batch."""
    from mmdet3d.testing import create_detector_inputs

    merged: Dict[str, Any] = {"inputs": {"points": [], "img": []}, "data_samples": []}
    for i in range(batch):
        one = create_detector_inputs(seed=seed + i, with_points=True, with_img=True, img_size=img_size,
                                     num_points=num_points, num_gt_instance=num_gt, num_classes=NUM_CLASSES,
                                     bboxes_3d_type="depth")
        merged["inputs"]["points"] += one["inputs"]["points"]
        merged["inputs"]["img"] += one["inputs"]["img"]
        merged["data_samples"] += one["data_samples"]
    return merged


def fusion_of(model):
    """The joint tower's SeedFeatureFusion (None when the model was not built from the project config)."""
    return getattr(getattr(model, "pts_bbox_head_joint", None), "seed_fusion", None)


def check(options: Optional[Dict[str, Any]] = None, batch: int = 2) -> Dict[str, Any]:
    """One loss + backward and one predict on CPU; returns what happened (JSON-able)."""
    import torch

    cfg = load_config(options=options)
    model = build_model(cfg)
    packed = detector_inputs(batch=batch)
    out: Dict[str, Any] = {"data": GENERATED}
    model.train()
    start = time.perf_counter()
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")
    total, log_vars = model.parse_losses(losses)
    total.backward()
    out["train_s"] = round(time.perf_counter() - start, 2)
    out["losses"] = {k: round(float(v), 6) for k, v in log_vars.items()}
    fusion = fusion_of(model)
    if fusion is not None and fusion.last_stats is not None:
        out["solver"] = fusion.last_stats.summary()
        back = fusion.last_stats.backward
        out["adjoint"] = back.summary() if back is not None else None
        grads = [p.grad for p in fusion.parameters() if p.grad is not None]
        out["fusion_grad_norm"] = float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode="predict")
    out["predict_s"] = round(time.perf_counter() - start, 2)
    out["boxes_per_sample"] = [int(r.pred_instances_3d.bboxes_3d.tensor.shape[0]) for r in results]
    return out


def train_script() -> str:
    """mmdet3d's tools/train.py as the wheel ships it (mmdet3d/.mim/tools/train.py)."""
    import mmdet3d

    path = Path(mmdet3d.__file__).resolve().parent / ".mim" / "tools" / "train.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this mmdet3d install has no .mim/tools; use tools/train.py "
                                "from a clone of open-mmlab/mmdetection3d at v1.4.0")
    return str(path)


def train(args: Sequence[str]) -> None:
    """mmdet3d's tools/train.py with ``args`` (e.g. the project config), the CPU stand-ins installed first."""
    from . import cpu_ops

    cpu_ops.install()
    script = train_script()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        rest = argv[1:]
        train(rest if rest else [str(config_path())])
        return 0
    parser = argparse.ArgumentParser(prog="python -m deqfusion.adapters.mmdet3d.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--full-solve", action="store_true",
                        help=f"use the config's solver limits instead of {FAST_OPTIONS}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    opts = None if args.full_solve else {"model.pts_bbox_heads.joint.deq_fusion.options": FAST_OPTIONS}
    print(json.dumps(check(opts, batch=args.batch), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
