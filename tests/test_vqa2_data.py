"""The shared VQA-v2-format generator (adapters/common/vqa2.py): format, determinism, and a signal that
lives in the image features (a reader that looks at them answers; the image-blind prior does not)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deqfusion.adapters.common import vqa2


def test_scenes_and_questions_are_deterministic_and_well_formed():
    a = vqa2.ask(vqa2.make_scenes(20, seed=3, first_image_id=100), per_image=3, seed=3)
    b = vqa2.ask(vqa2.make_scenes(20, seed=3, first_image_id=100), per_image=3, seed=3)
    assert a == b and len(a) == 60
    c = vqa2.ask(vqa2.make_scenes(20, seed=4, first_image_id=100), per_image=3, seed=4)
    assert a != c
    assert {q.answer_type for q in a} == set(vqa2.ANSWER_TYPES)
    assert len({q.question_id for q in a}) == 60 and all(q.question_id // 1000 == q.image_id for q in a)
    assert all(len(q.answers) == 10 and q.multiple_choice_answer in vqa2.answer_vocabulary() for q in a)


def test_json_has_the_keys_the_official_files_and_evaluation_read(tmp_path):
    qas = vqa2.ask(vqa2.make_scenes(4), per_image=3)
    ques = vqa2.questions_json(qas, vqa2.VAL)
    anns = vqa2.annotations_json(qas, vqa2.VAL)
    for key in ("info", "task_type", "data_type", "data_subtype", "license", "questions"):
        assert key in ques                       # vqa.py loadRes copies the first five from the question file
    assert ques["task_type"] == "Open-Ended" and ques["data_subtype"] == "val2014"
    assert set(ques["questions"][0]) == {"image_id", "question", "question_id"}
    ann = anns["annotations"][0]
    assert set(ann) == {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"}
    assert set(ann["answers"][0]) == {"answer", "answer_confidence", "answer_id"} and len(ann["answers"]) == 10
    path = vqa2.write_json(tmp_path / vqa2.question_file(vqa2.VAL), ques)
    assert path.name == "v2_OpenEnded_mscoco_val2014_questions.json" and json.loads(path.read_text()) == ques
    assert vqa2.annotation_file(vqa2.TRAIN, prefix="") == "mscoco_train2014_annotations.json"
    assert vqa2.coco_image_name(vqa2.TEST_DEV, 7) == "COCO_test2015_000000000007.jpg"
    assert "not a result" in ques["info"]["description"]


def test_region_features_layout():
    scene = vqa2.make_scenes(1, first_image_id=5)[0]
    r = vqa2.region_features(scene, dim=64)
    assert r.features.dtype == np.float32 and r.features.shape == (r.num_boxes, 64) and 10 <= r.num_boxes <= 100
    assert (r.features >= 0).all() and r.boxes.shape == (r.num_boxes, 4) and r.boxes.dtype == np.float32
    assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
    assert vqa2.region_features(scene, dim=64, num_boxes=36).num_boxes == 36
    assert np.array_equal(vqa2.region_features(scene, dim=64).features, r.features)
    with pytest.raises(ValueError, match="boxes were asked for"):
        vqa2.region_features(vqa2.Scene(1, (("dog", "red", 3), ("cat", "red", 3))), dim=8, num_boxes=4)


def _read(scene_regions: vqa2.Regions, question: str) -> str:
    """Answer from the features alone, by matching rows against the world's object and colour vectors."""
    obj_vec, col_vec, _ = vqa2._world(scene_regions.features.shape[1])
    obj = next(o for o in vqa2.OBJECTS if f" {o} " in f" {question.rstrip('?')} " or f" {o}s " in f" {question} ")
    v = obj_vec[vqa2.OBJECTS.index(obj)]
    feats = scene_regions.features
    score = feats @ np.maximum(v, 0) / np.linalg.norm(np.maximum(v, 0)) ** 2
    hits = np.flatnonzero(score > 0.6)
    if question.startswith("Is there"):
        return "yes" if len(hits) else "no"
    if question.startswith("How many"):
        return str(len(hits))
    colour = feats[hits].mean(0) if len(hits) else feats.mean(0)
    return vqa2.COLOURS[int(np.argmax([colour @ np.maximum(c, 0) for c in col_vec]))]


def test_answers_are_readable_from_the_features_but_not_from_the_question_alone():
    train_scenes, val_scenes = vqa2.make_scenes(60, seed=1), vqa2.make_scenes(60, seed=2, first_image_id=1000)
    train, val = vqa2.ask(train_scenes, seed=1), vqa2.ask(val_scenes, seed=2)
    regions = {s.image_id: vqa2.region_features(s, dim=256, seed=2) for s in val_scenes}
    reader = vqa2.accuracy_by_type({q.question_id: _read(regions[q.image_id], q.question) for q in val}, val)
    prior = vqa2.prior_accuracy(train, val)
    assert reader["overall"] > 85.0, reader
    assert prior["overall"] < 60.0 and prior["other"] < 40.0, prior
    assert reader["overall"] > prior["overall"] + 30.0


def test_vqa_accuracy_is_the_official_formula():
    assert vqa2.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa2.vqa_accuracy("no", ["yes"] * 10) == 0.0
    # 2 of 10 humans said it: 8 subsets see both (2/3), 2 see one (1/3)
    assert vqa2.vqa_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
