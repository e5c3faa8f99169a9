"""block's VQA-v2 data: the layout block.datasets.vqa2 reads, a check of real data, and generated data.

What block (e938e9e) reads, relative to the clone's root with the options' defaults:

``dataset.dir`` = ``data/vqa/vqa2``
    ``raw/annotations/`` with VQA-v2's six JSON files under the names block's ``download()`` gives them
    (the official ones without the ``v2_`` prefix): ``mscoco_{train,val}2014_annotations.json``,
    ``OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json``.  block tokenises
    them into ``processed/nans,<nans>_minwcount,0_nlp,mcb_proc_split,train/`` itself on first use.
``dataset.dir_rcnn`` = ``data/vqa/coco/extract_rcnn/2018-04-27_bottom-up-attention_fixed_36``
    one ``torch.save`` file per image, ``<COCO image name>.pth`` (``COCO_train2014_000000000042.jpg.pth``),
    a dict with ``pooled_feat`` (36, 2048) float32, ``rois`` (36, 4) boxes in pixels and ``norm_rois``
    (36, 4) the boxes divided by the image's width and height.
``model.network.txt_enc.dir_st`` = ``data/skip-thoughts``
    skip-thoughts' ``dictionary.txt``, ``utable.npy`` (words x 620) and ``uni_skip.npz`` (the GRU).

Real data: ``block/datasets/scripts/download_vqa2.sh`` in the clone (VQA-v2 JSON, COCO, the bottom-up
features) and the skip-thoughts files that ``skipthoughts`` downloads on first use (about 2.3 GB).

Generated data (:func:`generate`): the questions, ten-answer annotations and region features of
:mod:`deqfusion.adapters.common.vqa2` (the same generator as MCAN's) in this layout, plus two question
kinds of our own (block's preprocessing lists the 20 most common answers and words, so it needs at least
20 different answers; the shared generator has 12), and a **stand-in for skip-thoughts**: files of
skip-thoughts' format with random weights, a dictionary of the generated words only.  Tests only:
every number from it is "generated data, not a result".
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..common import vqa2
from ..common.report import GENERATED

__all__ = [
    "DataPaths", "DataError", "GeneratedData", "ANNOTATION_FILES", "RCNN_SUBDIR", "SKIPTHOUGHTS_FILES",
    "generate", "check", "is_generated", "read_generated", "extra_questions", "all_questions",
    "write_skipthoughts_standin", "MARKER",
]

RCNN_SUBDIR = Path("coco/extract_rcnn/2018-04-27_bottom-up-attention_fixed_36")
NUM_REGIONS = 36
FEATURE_DIM = 2048
SKIPTHOUGHTS_FILES = ("dictionary.txt", "utable.npy", "uni_skip.npz")
WORD_DIM, HIDDEN = 620, 2400          # skip-thoughts' uni-skip sizes (fixed by the skipthoughts package)
MARKER = "deqfusion_generated.json"   # in dataset.dir and dir_st of generated data
MIN_ANSWERS = 20                      # block's top_answers / top_words print the 20 most common
# first image ids of the generated splits (distinct, so question ids never collide)
FIRST_IMAGE_ID = {vqa2.TRAIN: 1, vqa2.VAL: 500001, vqa2.TEST: 900001}


def _ann(subtype: str) -> str:
    return vqa2.annotation_file(subtype, prefix="")


def _ques(subtype: str) -> str:
    return vqa2.question_file(subtype, prefix="")


ANNOTATION_FILES = (_ann(vqa2.TRAIN), _ques(vqa2.TRAIN), _ann(vqa2.VAL), _ques(vqa2.VAL),
                    _ques(vqa2.TEST), _ques(vqa2.TEST_DEV))


class DataError(FileNotFoundError):
    """block's data is missing or incomplete; the message names the files and how to get them."""


@dataclass(frozen=True)
class DataPaths:
    """Where block reads its data (the three options that hold paths)."""

    vqa_dir: Path          # dataset.dir
    rcnn_dir: Path         # dataset.dir_rcnn
    st_dir: Path           # model.network.txt_enc.dir_st

    @classmethod
    def from_root(cls, root: Path) -> DataPaths:
        """block's layout under one folder (the clone's ``data/`` with the options' defaults)."""
        root = Path(root)
        return cls(root / "vqa" / "vqa2", root / "vqa" / RCNN_SUBDIR, root / "skip-thoughts")

    def flags(self) -> List[str]:
        """The bootstrap flags that point a run at these folders."""
        return ["--dataset.dir", str(self.vqa_dir), "--dataset.dir_rcnn", str(self.rcnn_dir),
                "--model.network.txt_enc.dir_st", str(self.st_dir)]

    @property
    def annotations(self) -> Path:
        return self.vqa_dir / "raw" / "annotations"


@dataclass
class GeneratedData:
    paths: DataPaths
    nans: int                                  # distinct training answers: the --dataset.nans to run with
    counts: Dict[str, int] = field(default_factory=dict)   # questions per split
    images: Dict[str, int] = field(default_factory=dict)   # images per split
    seed: int = 0

    def to_json(self) -> Dict[str, Any]:
        return {"label": GENERATED, "nans": self.nans, "counts": self.counts, "images": self.images,
                "seed": self.seed, "generator": "deqfusion.adapters.mutan.data (deqfusion.adapters.common.vqa2)"}


# ---------------------------------------------------------------------------------------------------
# questions


def _noisy(truth: str, alternatives: Sequence[str], noise: float, rng: np.random.RandomState) -> Tuple[str, ...]:
    others = [a for a in alternatives if a != truth]
    return tuple(others[rng.randint(len(others))] if rng.rand() < noise else truth for _ in range(10))


def extra_questions(scenes: Sequence[vqa2.Scene], seed: int = 0, noise: float = 0.1) -> List[vqa2.QA]:
    """Two more image-dependent question kinds, so that block sees more than 20 different answers:
    "How many objects are there?" (the total count, 1-9) and "What is the <colour> object?" (the
    object's name; asked where one object has that colour)."""
    totals = [str(n) for n in range(1, 10)]
    out: List[vqa2.QA] = []
    for scene in scenes:
        rng = np.random.RandomState((int(seed) * 7919 + scene.image_id * 104729 + 5) % (2 ** 32))
        total = sum(n for _, _, n in scene.objects)
        out.append(vqa2.QA(scene.image_id * 1000 + 900, scene.image_id, "How many objects are there?",
                           "how many", "number", _noisy(str(total), totals, noise, rng)))
        colours = Counter(c for _, c, _ in scene.objects)
        unique = [(o, c) for o, c, _ in scene.objects if colours[c] == 1]
        if unique:
            obj, colour = unique[rng.randint(len(unique))]
            out.append(vqa2.QA(scene.image_id * 1000 + 901, scene.image_id, f"What is the {colour} object?",
                               "what is the", "other", _noisy(obj, vqa2.OBJECTS, noise, rng)))
    return out


def all_questions(scenes: Sequence[vqa2.Scene], per_image: int = 3, seed: int = 0) -> List[vqa2.QA]:
    """The shared generator's questions plus :func:`extra_questions`, ordered by question id."""
    qas = vqa2.ask(scenes, per_image=per_image, seed=seed) + extra_questions(scenes, seed=seed)
    return sorted(qas, key=lambda q: q.question_id)


def _tokens(question: str) -> List[str]:
    """block's ``tokenize_mcb`` (lower case, punctuation dropped), for the stand-in dictionary."""
    text = re.sub(r"[?!'\"$:@(),.;]", "", question.lower())
    text = re.sub(r"[-/]", " ", text)
    return [w for w in text.split(" ") if w]


# ---------------------------------------------------------------------------------------------------
# writing


def _save_regions(path: Path, regions: vqa2.Regions) -> None:
    import torch

    boxes = torch.from_numpy(regions.boxes)
    scale = torch.tensor([regions.image_w, regions.image_h, regions.image_w, regions.image_h], dtype=torch.float32)
    torch.save({"pooled_feat": torch.from_numpy(regions.features), "rois": boxes, "norm_rois": boxes / scale}, path)


def write_skipthoughts_standin(st_dir: Path, words: Sequence[str], seed: int = 0) -> None:
    """skip-thoughts' three files with random weights (TESTS ONLY: not the pretrained model)."""
    st_dir = Path(st_dir)
    st_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["UNK", *sorted(set(words) - {"UNK"})]
    (st_dir / "dictionary.txt").write_text("".join(w + "\n" for w in vocab), encoding="utf-8")
    rng = np.random.RandomState(seed)

    def weights(*shape: int, scale: float) -> np.ndarray:
        return (scale * rng.randn(*shape)).astype(np.float32)

    np.save(st_dir / "utable.npy", weights(len(vocab), WORD_DIM, scale=0.1))
    np.savez(st_dir / "uni_skip.npz",
             encoder_W=weights(WORD_DIM, 2 * HIDDEN, scale=WORD_DIM ** -0.5),
             encoder_b=np.zeros(2 * HIDDEN, np.float32),
             encoder_U=weights(HIDDEN, 2 * HIDDEN, scale=HIDDEN ** -0.5),
             encoder_Wx=weights(WORD_DIM, HIDDEN, scale=WORD_DIM ** -0.5),
             encoder_bx=np.zeros(HIDDEN, np.float32),
             encoder_Ux=weights(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5))
    (st_dir / MARKER).write_text(json.dumps({
        "label": GENERATED,
        "what": "a stand-in for skip-thoughts for tests only: random weights in skip-thoughts' file format, "
                "a dictionary of the generated questions' words; NOT the pretrained uni-skip model"}), encoding="utf-8")


def generate(paths: DataPaths, train_images: int = 48, val_images: int = 16, test_images: int = 4,
             per_image: int = 3, seed: int = 0, progress: bool = False) -> GeneratedData:
    """Write generated VQA-v2-format data in block's layout under ``paths``; returns what was written."""
    import torch  # noqa: F401 - the feature files are torch.save dicts

    from tqdm import tqdm

    splits = {vqa2.TRAIN: train_images, vqa2.VAL: val_images, vqa2.TEST: test_images}
    qas: Dict[str, List[vqa2.QA]] = {}
    scenes: Dict[str, List[vqa2.Scene]] = {}
    for subtype, n in splits.items():
        scenes[subtype] = vqa2.make_scenes(n, seed=seed, first_image_id=FIRST_IMAGE_ID[subtype])
        qas[subtype] = all_questions(scenes[subtype], per_image=per_image, seed=seed)
    answers = Counter(q.multiple_choice_answer for q in qas[vqa2.TRAIN])
    if len(answers) < MIN_ANSWERS:
        raise ValueError(f"{train_images} training images give {len(answers)} different answers; block's "
                         f"preprocessing needs at least {MIN_ANSWERS}: generate more training images")
    paths.annotations.mkdir(parents=True, exist_ok=True)
    for subtype in (vqa2.TRAIN, vqa2.VAL):
        vqa2.write_json(paths.annotations / _ann(subtype), vqa2.annotations_json(qas[subtype], subtype))
    for subtype in (vqa2.TRAIN, vqa2.VAL, vqa2.TEST):
        vqa2.write_json(paths.annotations / _ques(subtype), vqa2.questions_json(qas[subtype], subtype))
    dev = qas[vqa2.TEST][: max(1, len(qas[vqa2.TEST]) // 2)]     # test-dev: a part of test, as in VQA-v2
    vqa2.write_json(paths.annotations / _ques(vqa2.TEST_DEV), vqa2.questions_json(dev, vqa2.TEST_DEV))

    paths.rcnn_dir.mkdir(parents=True, exist_ok=True)
    todo = [(subtype, scene) for subtype in splits for scene in scenes[subtype]]
    for subtype, scene in tqdm(todo, desc="region features", disable=not progress, leave=False):
        regions = vqa2.region_features(scene, dim=FEATURE_DIM, seed=seed, num_boxes=NUM_REGIONS)
        _save_regions(paths.rcnn_dir / f"{vqa2.coco_image_name(subtype, scene.image_id)}.pth", regions)

    words = [w for split in qas.values() for q in split for w in _tokens(q.question)]
    write_skipthoughts_standin(paths.st_dir, words, seed=seed)
    out = GeneratedData(paths, nans=len(answers), counts={k: len(v) for k, v in qas.items()},
                        images=dict(splits), seed=seed)
    (paths.vqa_dir / MARKER).write_text(json.dumps(out.to_json(), indent=1), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------
# reading


def is_generated(paths: DataPaths) -> bool:
    return (paths.vqa_dir / MARKER).is_file() or (paths.st_dir / MARKER).is_file()


def read_generated(paths: DataPaths) -> Optional[Dict[str, Any]]:
    marker = paths.vqa_dir / MARKER
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def check(paths: DataPaths, clone: Optional[Path] = None) -> None:
    """Raise :class:`DataError` naming every missing file of block's train/val run and how to get it."""
    missing: List[str] = []
    missing += [str(paths.annotations / f) for f in ANNOTATION_FILES if not (paths.annotations / f).is_file()]
    if not paths.rcnn_dir.is_dir() or not any(paths.rcnn_dir.glob("COCO_*.jpg.pth")):
        missing.append(f"{paths.rcnn_dir}/COCO_<split>_<image id>.jpg.pth (bottom-up features, 36 regions)")
    missing += [str(paths.st_dir / f) for f in SKIPTHOUGHTS_FILES if not (paths.st_dir / f).is_file()]
    if missing:
        script = (Path(clone) if clone else Path("<block clone>")) / "block/datasets/scripts/download_vqa2.sh"
        shown = "; ".join(missing[:4]) + ("; ..." if len(missing) > 4 else "")
        raise DataError(
            f"block's VQA-v2 data is incomplete ({len(missing)} missing: {shown}). Get it with {script} "
            f"(run from the clone's root: VQA-v2 questions/annotations into data/vqa/vqa2/raw, COCO and the "
            f"bottom-up features into data/vqa/coco/extract_rcnn); the skip-thoughts files "
            f"({', '.join(SKIPTHOUGHTS_FILES)}, about 2.3 GB) come from the URLs in the skipthoughts package "
            f"(skipthoughts.skipthoughts.urls) into {paths.st_dir}; or pass --generated for generated data")
