"""Generated VQA-v2-format questions, answers and region features with a learnable signal (MCAN, Mutan).

The data of the paper's Table 5 (VQA-v2 questions and answers on COCO images, bottom-up region
features) is not on the machines this project is built on.  The VQA upstreams are therefore run on
generated data in their exact on-disk formats.  This module makes the parts every VQA upstream reads
alike; each adapter writes them in its own upstream's layout (folders, file names, feature format).

The signal: every image has a latent *scene* (which objects it shows, each with one colour and a
count).  Questions of VQA's three answer types ask about it -- "Is there a dog in the picture?"
(yes/no), "How many cats are there?" (number), "What color is the car?" (other) -- so an answer
depends on the question *and* the image.  The region features encode the scene the way bottom-up
features encode objects: one row per box, an object instance's row is its object vector plus its
colour vector plus noise (non-negative, like the pooled ReLU features of Faster R-CNN), and
background boxes fill up the rest.  The object and colour vectors are fixed for all splits and all
upstreams (a fixed seed), so a model trained on the train split can answer on the val split.
Numbers from such data show that a pipeline runs and learns; they are never results
(``adapters/common/report.py: GENERATED``).

API (kept stable; MCAN's and Mutan's adapters both build on it):

``make_scenes(num_images, seed=0, first_image_id=1) -> List[Scene]``
    one scene per image, image ids ``first_image_id, first_image_id + 1, ...``.
``ask(scenes, per_image=3, seed=0, noise=0.1) -> List[QA]``
    ``per_image`` questions per scene, cycling yes/no, number, other; ten answers each, a share
    ``noise`` of them a wrong answer of the same type (as human annotators disagree).  Question ids
    are ``image_id * 1000 + k`` (VQA-v2's scheme), so splits with distinct image ids never collide.
``region_features(scene, dim=2048, seed=0, num_boxes=None, min_boxes=10, max_boxes=100) -> Regions``
    ``features`` (N, dim) float32 >= 0, ``boxes`` (N, 4) float32 (x1, y1, x2, y2 in pixels),
    ``image_h``, ``image_w``; N = ``num_boxes`` if given (block's fixed 36), else the scene's
    instances plus background clipped to [min_boxes, max_boxes] (MCAN's adaptive 10-100).
``questions_json(qas, subtype)`` / ``annotations_json(qas, subtype)``
    the dicts of ``v2_OpenEnded_mscoco_<subtype>_questions.json`` / ``v2_mscoco_<subtype>_annotations.json``
    (every key the official files and the official evaluation (``vqa.py`` / ``vqaEval.py``) read).
``question_file(subtype, prefix="v2_")``, ``annotation_file(subtype, prefix="v2_")``,
``coco_image_name(subtype, image_id)``
    the official file names (block renames the files without the ``v2_`` prefix: ``prefix=""``).
``write_json(path, obj)``
``vqa_accuracy(pred, answers)``, ``accuracy_by_type(predictions, qas)``, ``prior_accuracy(train, eval)``
    the official VQA accuracy (min(#matching humans / 3, 1), averaged over the ten leave-one-out
    subsets), per answer type in %, and the accuracy of answering each question type's most common
    training answer without looking at the image: the bar a model must clear to have read the image.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "OBJECTS", "COLOURS", "COUNTS", "ANSWER_TYPES", "TRAIN", "VAL", "TEST", "TEST_DEV", "WORLD_SEED",
    "Scene", "QA", "Regions", "make_scenes", "ask", "region_features", "questions_json", "annotations_json",
    "question_file", "annotation_file", "coco_image_name", "write_json", "answer_vocabulary",
    "vqa_accuracy", "accuracy_by_type", "prior_accuracy",
]

OBJECTS = ("dog", "cat", "car", "ball", "cup", "bird")
COLOURS = ("red", "blue", "green", "yellow", "white", "black")
COUNTS = (1, 2, 3)
ANSWER_TYPES = ("yes/no", "number", "other")
TRAIN, VAL, TEST, TEST_DEV = "train2014", "val2014", "test2015", "test-dev2015"
WORLD_SEED = 20230517            # the object/colour vectors: one fixed "world" for every split and upstream
IMAGE_H, IMAGE_W = 480, 640
_LICENSE = {"url": "https://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}
_INFO = {"description": "Generated VQA-v2-format data (deqfusion): not VQA-v2; generated data, not a result",
         "url": "https://visualqa.org", "version": "2.0", "year": 2017, "contributor": "deqfusion generator",
         "date_created": "2017-04-26 17:07:13"}


@dataclass(frozen=True)
class Scene:
    """What one generated image shows: (object, colour, count) for each object present."""

    image_id: int
    objects: Tuple[Tuple[str, str, int], ...]

    def find(self, obj: str) -> Optional[Tuple[str, str, int]]:
        return next((o for o in self.objects if o[0] == obj), None)


@dataclass(frozen=True)
class QA:
    """One question with its ten answers, as VQA-v2's question and annotation files hold it."""

    question_id: int
    image_id: int
    question: str
    question_type: str
    answer_type: str
    answers: Tuple[str, ...]          # ten, one per annotator

    @property
    def multiple_choice_answer(self) -> str:
        """The most common of the ten answers (ties: the first given)."""
        return Counter(self.answers).most_common(1)[0][0]


@dataclass(frozen=True)
class Regions:
    """Bottom-up-style region features of one image: one row per box."""

    features: np.ndarray              # (N, dim) float32, >= 0
    boxes: np.ndarray                 # (N, 4) float32: x1, y1, x2, y2 in pixels
    image_h: int
    image_w: int

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


def _rng(seed: int, *salt: int) -> np.random.RandomState:
    return np.random.RandomState(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *salt]).generate_state(1)[0])


def make_scenes(num_images: int, seed: int = 0, first_image_id: int = 1) -> List[Scene]:
    """``num_images`` scenes, each with 1-3 distinct objects, a colour and a count (1-3) for each."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    scenes = []
    for k in range(num_images):
        image_id = first_image_id + k
        rng = _rng(seed, 1, image_id)
        chosen = rng.choice(len(OBJECTS), size=rng.randint(1, 4), replace=False)
        objs = tuple((OBJECTS[i], COLOURS[rng.randint(len(COLOURS))], int(COUNTS[rng.randint(len(COUNTS))]))
                     for i in sorted(chosen))
        scenes.append(Scene(image_id, objs))
    return scenes


def _plural(obj: str) -> str:
    return obj + "s"


def _noisy(truth: str, alternatives: Sequence[str], noise: float, rng: np.random.RandomState) -> Tuple[str, ...]:
    others = [a for a in alternatives if a != truth]
    return tuple(others[rng.randint(len(others))] if rng.rand() < noise else truth for _ in range(10))


def ask(scenes: Sequence[Scene], per_image: int = 3, seed: int = 0, noise: float = 0.1) -> List[QA]:
    """``per_image`` questions about each scene, answer types in turn (yes/no, number, other)."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5) so that the true answer stays the most common, got {noise}")
    if not 1 <= per_image <= 999:
        raise ValueError(f"per_image must be in 1..999 (question ids are image_id * 1000 + k), got {per_image}")
    numbers = [str(c) for c in (0,) + COUNTS]
    out: List[QA] = []
    for scene in scenes:
        rng = _rng(seed, 2, scene.image_id)
        present = [o[0] for o in scene.objects]
        absent = [o for o in OBJECTS if o not in present]
        for k in range(per_image):
            kind = ANSWER_TYPES[(scene.image_id + k) % 3]
            qid = scene.image_id * 1000 + k
            if kind == "yes/no":
                yes = not absent or rng.rand() < 0.5
                obj = present[rng.randint(len(present))] if yes else absent[rng.randint(len(absent))]
                q, qtype, truth, alts = f"Is there a {obj} in the picture?", "is there a", "yes" if yes else "no", ("yes", "no")
            elif kind == "number":
                obj = present[rng.randint(len(present))] if not absent or rng.rand() < 0.8 else absent[rng.randint(len(absent))]
                found = scene.find(obj)
                q, qtype, truth, alts = f"How many {_plural(obj)} are there?", "how many", str(found[2] if found else 0), numbers
            else:
                obj, colour, _ = scene.objects[rng.randint(len(scene.objects))]
                q, qtype, truth, alts = f"What color is the {obj}?", "what color is the", colour, COLOURS
            out.append(QA(qid, scene.image_id, q, qtype, kind, _noisy(truth, alts, noise, rng)))
    return out


@functools.lru_cache(maxsize=8)
def _world(dim: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object vectors, colour vectors, background vector), the same for every split and upstream."""
    rng = _rng(WORLD_SEED, 3, dim)
    return (rng.randn(len(OBJECTS), dim).astype(np.float32), rng.randn(len(COLOURS), dim).astype(np.float32),
            rng.randn(dim).astype(np.float32))


def region_features(scene: Scene, dim: int = 2048, seed: int = 0, num_boxes: Optional[int] = None,
                    min_boxes: int = 10, max_boxes: int = 100, noise: float = 0.3) -> Regions:
    """Region features that encode ``scene``: one box per object instance, background boxes for the rest."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    obj_vec, col_vec, bg_vec = _world(int(dim))
    rng = _rng(seed, 4, scene.image_id)
    rows = [obj_vec[OBJECTS.index(o)] + col_vec[COLOURS.index(c)] for o, c, n in scene.objects for _ in range(n)]
    n = num_boxes if num_boxes is not None else min(max(len(rows) + 2, min_boxes), max_boxes)
    if n < len(rows):
        raise ValueError(f"image {scene.image_id} shows {len(rows)} object instances but only {n} boxes were asked for")
    rows += [bg_vec] * (n - len(rows))
    feats = np.stack(rows) + noise * rng.randn(n, dim).astype(np.float32)
    feats = np.maximum(feats, 0.0).astype(np.float32)[rng.permutation(n)]  # box order carries no signal
    x1 = rng.uniform(0, IMAGE_W * 0.7, n)
    y1 = rng.uniform(0, IMAGE_H * 0.7, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(16, IMAGE_W * 0.3, n), y1 + rng.uniform(16, IMAGE_H * 0.3, n)], 1)
    return Regions(feats, boxes.astype(np.float32), IMAGE_H, IMAGE_W)


# ---------------------------------------------------------------------------------------------------
# VQA-v2's files


def question_file(subtype: str, prefix: str = "v2_") -> str:
    """``v2_OpenEnded_mscoco_train2014_questions.json`` and the like."""
    return f"{prefix}OpenEnded_mscoco_{subtype}_questions.json"


def annotation_file(subtype: str, prefix: str = "v2_") -> str:
    """``v2_mscoco_train2014_annotations.json`` and the like (test splits have none)."""
    return f"{prefix}mscoco_{subtype}_annotations.json"


def coco_image_name(subtype: str, image_id: int) -> str:
    """``COCO_train2014_000000000042.jpg`` (test-dev images are test2015 images)."""
    folder = TEST if subtype == TEST_DEV else subtype
    return f"COCO_{folder}_{int(image_id):012d}.jpg"


def questions_json(qas: Sequence[QA], subtype: str) -> Dict[str, Any]:
    """The content of VQA-v2's open-ended question file for ``subtype``."""
    return {"info": dict(_INFO), "task_type": "Open-Ended", "data_type": "mscoco", "license": dict(_LICENSE),
            "data_subtype": subtype,
            "questions": [{"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in qas]}


def annotations_json(qas: Sequence[QA], subtype: str) -> Dict[str, Any]:
    """The content of VQA-v2's annotation file for ``subtype``."""
    anns = []
    for q in qas:
        mca = q.multiple_choice_answer
        anns.append({
            "question_type": q.question_type, "multiple_choice_answer": mca,
            "answers": [{"answer": a, "answer_confidence": "yes" if a == mca else "maybe", "answer_id": i + 1}
                        for i, a in enumerate(q.answers)],
            "image_id": q.image_id, "answer_type": q.answer_type, "question_id": q.question_id})
    return {"info": dict(_INFO), "license": dict(_LICENSE), "data_subtype": subtype, "annotations": anns,
            "data_type": "mscoco"}


def write_json(path: Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def answer_vocabulary() -> List[str]:
    """Every answer the generator can give."""
    return sorted({"yes", "no"} | {str(c) for c in (0,) + COUNTS} | set(COLOURS))


# ---------------------------------------------------------------------------------------------------
# accuracy


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: min(#other humans who said it / 3, 1), averaged over the ten humans."""
    accs = []
    for i in range(len(answers)):
        others = [a for j, a in enumerate(answers) if j != i]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


def accuracy_by_type(predictions: Mapping[int, str], qas: Sequence[QA]) -> Dict[str, float]:
    """Per answer type and overall VQA accuracy in % of ``predictions`` (question id -> answer)."""
    per: Dict[str, List[float]] = {t: [] for t in ANSWER_TYPES}
    for q in qas:
        per[q.answer_type].append(vqa_accuracy(predictions[q.question_id], q.answers))
    every = [a for v in per.values() for a in v]
    out = {t: 100.0 * sum(v) / len(v) for t, v in per.items() if v}
    out["overall"] = 100.0 * sum(every) / len(every) if every else float("nan")
    return out


def prior_accuracy(train: Sequence[QA], evaluate: Sequence[QA]) -> Dict[str, float]:
    """Accuracy of answering each question type's most common training answer, blind to the image."""
    by_type: Dict[str, Counter] = {}
    for q in train:
        by_type.setdefault(q.question_type, Counter())[q.multiple_choice_answer] += 1
    fallback = Counter(q.multiple_choice_answer for q in train).most_common(1)[0][0] if train else "yes"
    preds = {q.question_id: (by_type[q.question_type].most_common(1)[0][0] if q.question_type in by_type else fallback)
             for q in evaluate}
    return accuracy_by_type(preds, evaluate)
