"""The MCAN adapter without the upstream: settings, the fusion module and its Jacobian term, run-time
compatibility, MCAN's data layout and generator, and the parsers of MCAN's output."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from deqfusion.adapters import mcan as A
from deqfusion.adapters.common.settings import SettingsError
from deqfusion.adapters.mcan import compat, data as D, en_vectors_standin, runner as R


def test_settings_from_env_and_errors():
    s = A.Settings.from_env({"DEQFUSION_MCAN_FUSION": "sum", "DEQFUSION_MCAN_JAC_WEIGHT": "0.5",
                             "DEQFUSION_MCAN_LOG_EVERY": "7", "DEQFUSION_MCAN_OPTIONS": "f_max_iter=9"})
    assert (s.fusion, s.jac_weight, s.log_every, s.options) == ("sum", 0.5, 7, {"f_max_iter": 9})
    assert A.Settings().fusion == "deq" and A.Settings().jac_weight == A.DEFAULT_JAC_WEIGHT
    with pytest.raises(SettingsError, match="fusion must be one of"):
        A.Settings(fusion="concat")
    with pytest.raises(SettingsError, match="log_every"):
        A.Settings(log_every=-1)
    with pytest.raises(SettingsError, match="f_max_iter"):
        A.Settings.from_env({"DEQFUSION_MCAN_OPTIONS": "f_thres=9"})
    with pytest.raises(SettingsError, match="unknown setting"):
        A.Settings.from_env({"DEQFUSION_MCAN_JACWEIGHT": "1"})


class _Cfg:
    FLAT_OUT_SIZE = 16
    LOG_PATH = None
    VERSION = "t"


def test_sum_is_exactly_the_upstream_sum_and_builds_nothing():
    lang, img = torch.randn(3, 16), torch.randn(3, 16)
    assert A.build_fusion(_Cfg, A.Settings(fusion="sum")) is None
    assert torch.equal(A.fuse(None, lang, img), lang + img)
    assert A.jac_term(torch.nn.Linear(2, 2)) == 0


def _fusion(**kw):
    kw.setdefault("options", {"f_max_iter": 8, "b_max_iter": 8})
    kw.setdefault("log_every", 0)
    return A.build_fusion(_Cfg, A.Settings(**kw))


def test_training_forward_stashes_the_per_sample_weighted_term_once():
    torch.manual_seed(0)
    fusion = _fusion(jac_weight=0.25)
    captured = {}
    orig = fusion.deq.forward

    def spy(xs):
        out = orig(xs)
        captured["jac"] = out.jac_loss
        return out
    fusion.deq.forward = spy
    lang, img = torch.randn(5, 16), torch.randn(5, 16)
    fused = A.fuse(fusion, lang, img)
    assert fused.shape == (5, 16)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fusion = fusion
    net = torch.nn.DataParallel(Net())                     # jac_term sees through the wrapper
    term = A.jac_term(net)
    assert captured["jac"].item() > 0 and term.requires_grad
    assert torch.allclose(term, 0.25 * 5 * captured["jac"])  # sum_b w * J_b for MCAN's summed BCE
    assert A.jac_term(net) == 0                             # taken once
    assert fusion.jac_terms_taken == 1
    (fused.sum() + term).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_eval_mode_computes_and_stashes_no_jacobian_even_with_grad_enabled():
    fusion = _fusion()
    fusion.eval()
    lang = torch.randn(4, 16, requires_grad=True)
    A.fuse(fusion, lang, torch.randn(4, 16))                # MCAN's eval runs without no_grad
    assert fusion.pop_jac_term() == 0 and fusion.jac_terms_taken == 0
    summary = fusion.take_totals("eval")
    assert summary["forwards"] == 1 and "jac_loss_mean" not in summary
    assert fusion.take_totals("train") == {}


def test_zero_weight_skips_the_estimate():
    fusion = _fusion(jac_weight=0.0)
    assert fusion.deq.config.jac_reg is False
    A.fuse(fusion, torch.randn(2, 16), torch.randn(2, 16))
    assert fusion.pop_jac_term() == 0


def test_replicas_share_the_stash():
    fusion = _fusion()
    replica = fusion._replicate_for_data_parallel()          # what nn.DataParallel's replicate() makes
    assert replica._pending is fusion._pending


def test_statistics_lines_go_to_mcans_log_and_stdout(tmp_path, capsys):
    class Cfg(_Cfg):
        LOG_PATH = f"{tmp_path}/"
        VERSION = "v1"
    fusion = A.build_fusion(Cfg, A.Settings(options={"f_max_iter": 6, "b_max_iter": 6}, log_every=2))
    net = type("N", (), {"fusion": fusion})()
    for _ in range(5):
        (A.fuse(fusion, torch.randn(3, 16), torch.randn(3, 16)).sum() + A.jac_term(net)).backward()
    lines = (tmp_path / "log_run_v1.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[deqfusion] train forwards 1-2 (6 samples)")
    assert lines[1].startswith("[deqfusion] train forwards 3-4") and "jac_loss mean" in lines[1]
    assert all("adjoint steps mean" in ln for ln in lines)   # each previous forward's backward, read at the next
    assert "[deqfusion] train forwards 1-2" in capsys.readouterr().out


def test_observe_collects_built_modules():
    with A.observe() as built:
        f = _fusion()
    assert built == [f]
    _fusion()
    assert built == [f]


# ------------------------------------------------------------------------------------------------ compat


def test_standin_vectors_are_deterministic_and_shaped_like_spacy():
    nlp = en_vectors_standin.load()
    v = nlp("dog").vector
    assert v.shape == (300,) and v.dtype == np.float32 and np.array_equal(v, en_vectors_standin.load()("dog").vector)
    assert not np.allclose(v, nlp("cat").vector)
    assert np.allclose(nlp("dog cat").vector, (v + nlp("cat").vector) / 2, atol=1e-6)


def test_word_vectors_choice(monkeypatch):
    if compat.real_vectors_available():
        pytest.skip("the real en_vectors_web_lg is installed here")
    with pytest.raises(compat.CompatError, match="en_vectors_web_lg-2.1.0"):
        with compat.word_vectors("real"):
            pass
    assert "en_vectors_web_lg" not in sys.modules
    with compat.word_vectors("auto") as used:
        import en_vectors_web_lg

        assert used == "standin" and en_vectors_web_lg.IS_STANDIN
    assert "en_vectors_web_lg" not in sys.modules


def test_yaml_load_without_loader_and_model_overrides(tmp_path):
    yaml = pytest.importorskip("yaml")
    model = tmp_path / "large_model.yml"
    model.write_text("LAYER: 6\nHIDDEN_SIZE: 1024\n")
    other = tmp_path / "other.yml"
    other.write_text("LAYER: 6\n")
    with compat.yaml_load({"LAYER": 1}):
        with open(model) as f:
            assert yaml.load(f) == {"LAYER": 1, "HIDDEN_SIZE": 1024}
        with open(other) as f:
            assert yaml.load(f) == {"LAYER": 6}
    if int(yaml.__version__.split(".")[0]) >= 6:
        with open(model) as f, pytest.raises(TypeError):
            yaml.load(f)                                     # the trap, outside the block


def test_torch_threads_override_and_process_state():
    before = torch.get_num_threads()
    with compat.process_state(None, ["run.py"]):
        with compat.torch_threads(1):
            torch.set_num_threads(2)                         # what Cfgs.proc does
            assert torch.get_num_threads() == 1
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        assert sys.argv == ["run.py"]
    assert torch.get_num_threads() == before and sys.argv[0] != "run.py"


# ------------------------------------------------------------------------------------------------ data


def test_generated_layout_is_what_mcan_reads(tmp_path):
    qas = D.write_generated(tmp_path, D.GeneratedSpec(train_images=4, val_images=3, test_images=2, vg_images=2, feat_dim=32))
    assert D.check_layout(tmp_path) == tmp_path and D.generated_info(tmp_path)["spec"]["feat_dim"] == 32
    files = sorted((tmp_path / "coco_extract" / "train2014").glob("*.npz"))
    assert [f.name for f in files][0] == "COCO_train2014_000000000001.jpg.npz"
    # MCAN's img_feat_path_load: the image id is the digits after the last '_' up to the first '.'
    assert int(str(files[0]).split("/")[-1].split("_")[-1].split(".")[0]) == 1
    with np.load(files[0]) as npz:
        assert set(npz.files) == {"x", "bbox", "num_bbox", "image_h", "image_w"}
        n = int(npz["num_bbox"])
        assert npz["x"].shape == (32, n) and npz["x"].dtype == np.float32 and npz["bbox"].shape == (n, 4)
    vqa = tmp_path / "vqa"
    names = {p.name for p in vqa.iterdir()}
    assert {"v2_OpenEnded_mscoco_train2014_questions.json", "v2_OpenEnded_mscoco_val2014_questions.json",
            "v2_OpenEnded_mscoco_test2015_questions.json", "v2_OpenEnded_mscoco_test-dev2015_questions.json",
            "v2_mscoco_train2014_annotations.json", "v2_mscoco_val2014_annotations.json", "VG_questions.json",
            "VG_annotations.json"} == names
    vg = json.loads((vqa / "VG_annotations.json").read_text())["annotations"]
    assert len(vg) == 6 and not {a["question_id"] for a in vg} & {q.question_id for q in qas["train"]}
    assert [q.question_id for q in D.read_qas(tmp_path, "val")] == [q.question_id for q in qas["val"]]
    assert D.feature_dim(tmp_path) == 32


def test_missing_files_are_named_with_where_to_get_them(tmp_path, monkeypatch):
    D.write_generated(tmp_path, D.GeneratedSpec(train_images=2, val_images=2, test_images=1, vg_images=1, feat_dim=8))
    (tmp_path / "vqa" / "VG_questions.json").unlink()
    with pytest.raises(D.DataError, match=r"VG_questions\.json.*OneDrive"):
        D.check_layout(tmp_path)
    monkeypatch.delenv(D.ENV_DATA, raising=False)
    with pytest.raises(D.DataError, match="--generated"):
        D.locate(None)
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path.parent))
    assert D.locate(None) == tmp_path.parent


# ------------------------------------------------------------------------------------------------ parsers

LOG = """nowTime: 2026-12-01 09:16:03
epoch = 1  loss = 3844.8115
lr = 0.0025

Overall Accuracy is: 21.25
yes/no : 63.75 number : 0.00 other : 0.00 <SP>

nowTime: 2026-12-01 09:16:12
[deqfusion] train forwards 1-4 (32 samples): solver steps mean 10.0 max 10
epoch = 2  loss = 1887.6881
lr = 0.005

Overall Accuracy is: 30.50
yes/no : 70.00 number : 10.00 other : 5.50 <SP>

""".replace(" <SP>", " ")  # MCAN ends its per-type line with a space


def test_parse_mcans_log_and_progress_line():
    epochs = R.parse_log(LOG)
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[1]["loss"] == pytest.approx(1887.6881)
    assert epochs[0]["accuracy"] == {"overall": 21.25, "yes/no": 63.75, "number": 0.0, "other": 0.0}
    assert epochs[1]["accuracy"]["other"] == 5.5
    out = ("\r[version v][epoch  1][step    0/   9][train->val] loss: 2300.7993, lr: 2.50e-03          "
           "\r[version v][epoch  1][step    1/   9][train->val] loss: nan, lr: 2.50e-03          ")
    losses = R.parse_step_losses(out)
    assert losses[0] == pytest.approx(2300.7993) and np.isnan(losses[1]) and not R.finite(losses)


def test_render_labels_every_generated_row():
    from deqfusion.adapters.mcan import reproduce as P
    from deqfusion.adapters.common.report import GENERATED

    rows = [P.Row("sum", "MCAN", A.Settings(fusion="sum")), P.Row("deq", "MCAN + DEQ fusion", A.Settings())]
    runs = [{"row": "sum", "seed": 0, "accuracy": {"yes/no": 60.0, "number": 30.0, "other": 20.0, "overall": 40.0}},
            {"row": "deq", "seed": 0, "accuracy": {"yes/no": 61.0, "number": 31.0, "other": 21.0, "overall": 41.0}}]
    prior = {"yes/no": 50.0, "number": 40.0, "other": 17.0, "overall": 35.0}
    text = P.render(P.summarize(runs, rows), rows, True, prior, "x")
    ours = [ln for ln in text.splitlines() if ln.startswith("| MCAN") and "paper" not in ln or ln.startswith("| image")]
    assert len(ours) == 3 and all(GENERATED in ln for ln in ours)
    assert "| MCAN — paper | 84.67 | 48.44 | 58.52 | 67.02 |" in text
    assert "| MCAN + DEQ fusion — paper | 85.17 | 49.07 | 58.69 | 67.38 |" in text
    real = P.render(P.summarize(runs, rows), rows, False, None, "x")
    assert GENERATED not in real and "| MCAN | 60.00 | 30.00 | 20.00 | 40.00 |" in real


def test_stdout_tee_keeps_everything():
    sink = io.StringIO()
    tee = R._Tee(sink)
    tee.write("a\rb")
    assert tee.buffer_.getvalue() == "a\rb" == sink.getvalue()
