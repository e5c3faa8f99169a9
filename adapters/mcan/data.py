"""MCAN's data: the ``datasets/`` layout its ``cfgs/path_cfgs.py`` reads, a check of it, and a generator.

MCAN (README "Setup", ``cfgs/path_cfgs.py`` at 6b165e9) reads, relative to its working directory::

    datasets/coco_extract/{train2014,val2014,test2015}/COCO_<split>_<12-digit id>.jpg.npz
    datasets/vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json
    datasets/vqa/v2_mscoco_{train2014,val2014}_annotations.json
    datasets/vqa/VG_questions.json, VG_annotations.json      (MCAN's processed Visual Genome QA)

``PATH.check_path`` exits unless *all* of them exist, whatever the split (the vocabulary is always
built from the train, val, test and VG questions).  One ``.npz`` per image holds the bottom-up
features: ``x`` (2048, N) float32 (transposed on load), ``bbox`` (N, 4), ``num_bbox``, ``image_h``,
``image_w``; MCAN itself reads ``x`` only, and pads/cuts N to ``IMG_FEAT_PAD_SIZE`` (100).

:func:`check_layout` names every missing file and where to get it; :func:`write_generated` writes
a small data set of exactly this layout from :mod:`deqfusion.adapters.common.vqa2` (answers that
depend on the image features), marked by ``GENERATED.json`` so that no number from it passes for
a result.  The ``--DATA_PATH`` / ``--FEAT_PATH`` flags of ``run.py`` have no effect at the pin
(``PATH.__init__`` derives every path before the flags are set), so the runner links this folder
as ``datasets/`` into its working directory instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..common import vqa2

ENV_DATA = "DEQFUSION_MCAN_DATA"
MARKER = "GENERATED.json"
FEATURE_SPLITS = {"train": vqa2.TRAIN, "val": vqa2.VAL, "test": vqa2.TEST}
QUESTION_FILES = {"train": vqa2.question_file(vqa2.TRAIN), "val": vqa2.question_file(vqa2.VAL),
                  "test": vqa2.question_file(vqa2.TEST), "vg": "VG_questions.json"}
ANSWER_FILES = {"train": vqa2.annotation_file(vqa2.TRAIN), "val": vqa2.annotation_file(vqa2.VAL),
                "vg": "VG_annotations.json"}
TESTDEV_FILE = vqa2.question_file(vqa2.TEST_DEV)
HOW_TO_GET = {
    "features": "the bottom-up features train2014.tar.gz / val2014.tar.gz / test2015.tar.gz from the OneDrive or "
                "BaiduYun links in MCAN's README ('Setup'), unpacked into coco_extract/ (its setup.sh does that)",
    "vqa": "VQA-v2's questions and annotations from visualqa.org (MCAN's setup.sh downloads and unzips them into vqa/)",
    "vg": "MCAN's processed Visual Genome QA files from the OneDrive or BaiduYun links in MCAN's README ('Setup')",
}


class DataError(FileNotFoundError):
    """MCAN's data is missing or malformed; the message names the files and how to get them."""


def feature_name(subtype: str, image_id: int) -> str:
    """``COCO_train2014_000000000042.jpg.npz``: the name MCAN parses the image id from."""
    return vqa2.coco_image_name(subtype, image_id) + ".npz"


def required_paths(root: Path) -> Dict[str, List[Path]]:
    """What ``PATH.check_path`` checks, grouped by where to get it."""
    root = Path(root)
    return {
        "features": [root / "coco_extract" / sub for sub in FEATURE_SPLITS.values()],
        "vqa": [root / "vqa" / QUESTION_FILES[k] for k in ("train", "val", "test")]
               + [root / "vqa" / ANSWER_FILES[k] for k in ("train", "val")],
        "vg": [root / "vqa" / QUESTION_FILES["vg"], root / "vqa" / ANSWER_FILES["vg"]],
    }


def locate(explicit: Optional[Path] = None) -> Path:
    """The data folder: ``explicit``, else ``$DEQFUSION_MCAN_DATA``; it holds ``vqa/`` and ``coco_extract/``
    (MCAN's ``datasets/``; a folder holding ``datasets/`` is accepted too)."""
    text = str(explicit) if explicit is not None else os.environ.get(ENV_DATA, "")
    if not text:
        raise DataError(f"no VQA-v2 data for MCAN: pass --data-dir DIR or set ${ENV_DATA} to a folder laid out as "
                        f"MCAN's datasets/ (vqa/ and coco_extract/); or run on generated data with --generated")
    root = Path(text).expanduser()
    if not (root / "vqa").is_dir() and (root / "datasets" / "vqa").is_dir():
        root = root / "datasets"
    return root


def check_layout(root: Path, split: str = "train") -> Path:
    """``root`` if it has everything MCAN's check_path and the ``split`` run read; else a DataError naming it all."""
    root = Path(root)
    missing = {k: [p for p in paths if not p.exists()] for k, paths in required_paths(root).items()}
    lines = [f"  {p}  (get: {HOW_TO_GET[k]})" for k, paths in missing.items() for p in paths]
    if lines:
        raise DataError(f"MCAN's data folder {root} is incomplete (cfgs/path_cfgs.py would exit); missing:\n"
                        + "\n".join(lines))
    for part in split.split("+") + ["val"]:
        if part in FEATURE_SPLITS:
            folder = root / "coco_extract" / FEATURE_SPLITS[part]
            if next(folder.glob("*.npz"), None) is None:
                raise DataError(f"{folder} holds no .npz feature files; get: {HOW_TO_GET['features']}")
    return root


def generated_info(root: Path) -> Optional[Dict[str, Any]]:
    """The generator's record if ``root`` holds generated data, else None."""
    marker = Path(root) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def feature_dim(root: Path) -> int:
    """The width of the features (``x.shape[0]``) of the first training image."""
    first = next((Path(root) / "coco_extract" / vqa2.TRAIN).glob("*.npz"), None)
    if first is None:
        raise DataError(f"no training features under {root}/coco_extract/{vqa2.TRAIN}; get: {HOW_TO_GET['features']}")
    with np.load(first) as npz:
        return int(npz["x"].shape[0])


@dataclass(frozen=True)
class GeneratedSpec:
    """Sizes of a generated data set (images per split, questions per image, feature width)."""

    train_images: int = 48
    val_images: int = 24
    test_images: int = 4
    vg_images: int = 4
    per_image: int = 3
    feat_dim: int = 2048
    seed: int = 0
    noise: float = 0.1


def _write_features(folder: Path, subtype: str, scenes: List[vqa2.Scene], dim: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        r = vqa2.region_features(scene, dim=dim, seed=seed)
        np.savez(folder / feature_name(subtype, scene.image_id), x=r.features.T.copy(), bbox=r.boxes,
                 num_bbox=np.int64(r.num_boxes), image_h=np.int64(r.image_h), image_w=np.int64(r.image_w))


def write_generated(root: Path, spec: GeneratedSpec = GeneratedSpec()) -> Dict[str, List[vqa2.QA]]:
    """Write a generated data set in MCAN's ``datasets/`` layout under ``root``; returns the QA per split."""
    root = Path(root)
    first = {"train": 1, "val": 200_001, "test": 400_001}
    scenes = {"train": vqa2.make_scenes(spec.train_images, seed=spec.seed, first_image_id=first["train"]),
              "val": vqa2.make_scenes(spec.val_images, seed=spec.seed + 1, first_image_id=first["val"]),
              "test": vqa2.make_scenes(spec.test_images, seed=spec.seed + 2, first_image_id=first["test"])}
    for split, subtype in FEATURE_SPLITS.items():
        _write_features(root / "coco_extract" / subtype, subtype, scenes[split], spec.feat_dim, spec.seed)
    qas = {split: vqa2.ask(scenes[split], per_image=spec.per_image, seed=spec.seed + i, noise=spec.noise)
           for i, split in enumerate(("train", "val", "test"))}
    # MCAN's Visual Genome QA are on COCO train/val images; ids kept apart from VQA-v2's (k >= 500)
    vg_scenes = scenes["train"][: spec.vg_images]
    qas["vg"] = [vqa2.QA(q.image_id * 1000 + 500 + q.question_id % 1000, q.image_id, q.question, q.question_type,
                         q.answer_type, q.answers)
                 for q in vqa2.ask(vg_scenes, per_image=min(spec.per_image, 3), seed=spec.seed + 7, noise=spec.noise)]
    vqa_dir = root / "vqa"
    subtypes = {"train": vqa2.TRAIN, "val": vqa2.VAL, "test": vqa2.TEST, "vg": "vg"}
    for split, name in QUESTION_FILES.items():
        vqa2.write_json(vqa_dir / name, vqa2.questions_json(qas[split], subtypes[split]))
    for split, name in ANSWER_FILES.items():
        vqa2.write_json(vqa_dir / name, vqa2.annotations_json(qas[split], subtypes[split]))
    vqa2.write_json(vqa_dir / TESTDEV_FILE, vqa2.questions_json(qas["test"][: max(1, len(qas["test"]) // 2)], vqa2.TEST_DEV))
    vqa2.write_json(root / MARKER, {"what": "generated data, not a result (deqfusion.adapters.mcan.data.write_generated)",
                                    "spec": asdict(spec), "questions": {k: len(v) for k, v in qas.items()}})
    return qas


def read_qas(root: Path, split: str = "val") -> List[vqa2.QA]:
    """The questions with their ten answers of one annotated split (``train``, ``val``) of a data folder."""
    vqa_dir = Path(root) / "vqa"
    questions = json.loads((vqa_dir / QUESTION_FILES[split]).read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads((vqa_dir / ANSWER_FILES[split]).read_text())["annotations"]}
    out = []
    for q in questions:
        a = anns[q["question_id"]]
        out.append(vqa2.QA(q["question_id"], q["image_id"], q["question"], a["question_type"], a["answer_type"],
                           tuple(x["answer"] for x in a["answers"])))
    return out
