"""The Mutan adapter's own parts, without block or bootstrap: settings, the DEQ classifier and its swap into
a network, the Jacobian criterion, block-layout data, the options files, the runner's command and the
Table 5 report.  (block's real entry point on the real upstream: tests/test_mutan_upstream.py.)"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
import types
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from deqfusion.adapters import mutan as M
from deqfusion.adapters.common import vqa2
from deqfusion.adapters.common.report import GENERATED
from deqfusion.adapters.mutan import criterion as C
from deqfusion.adapters.mutan import data as D
from deqfusion.adapters.mutan import network as N
from deqfusion.adapters.mutan import options as O
from deqfusion.adapters.mutan import reproduce as P
from deqfusion.adapters.mutan import runner as R
from deqfusion.adapters.mutan.head import DEQClassifier

SMALL = {"f_max_iter": 8, "b_max_iter": 8}


# ------------------------------------------------------------------------------------------------
# settings


def _opts(deq=None):
    network = {"import": "deqfusion.adapters.mutan.network"}
    if deq is not None:
        network["deq"] = deq
    return {"model": {"network": network}}


def test_settings_come_from_the_options_section():
    s = M.settings_from_options(_opts({"fusion": "deq", "dim": 64, "jac_weight": 0.5,
                                       "options": {"f_max_iter": 7}}), environ={})
    assert (s.dim, s.jac_weight, s.options, s.is_deq) == (64, 0.5, {"f_max_iter": 7}, True)
    assert M.settings_from_options(_opts(), environ={}) == M.Settings()           # no section: the defaults
    assert M.Settings().dim == 700 and M.Settings().jac_weight == 0.1
    assert not M.settings_from_options(_opts({"fusion": "mutan"}), environ={}).is_deq


@pytest.mark.parametrize("section, words", [
    ({"dims": 64}, ["model.network.deq.dims", "dim"]),
    ({"dim": 0}, ["positive integer"]),
    ({"fusion": "block"}, ["deq", "mutan"]),
    ({"options": {"f_thres": 30}}, ["f_max_iter"]),
    ({"options": {"dim": 30}}, ["cannot be set here"]),
])
def test_bad_settings_name_the_fix(section, words):
    with pytest.raises(M.SettingsError) as err:
        M.settings_from_options(_opts(section), environ={})
    for w in words:
        assert w in str(err.value)


def test_environment_variables_are_refused_with_the_flag_to_use():
    with pytest.raises(M.SettingsError, match=r"--model.network.deq.jac_weight"):
        M.settings_from_options(_opts({}), environ={"DEQFUSION_MUTAN_JAC_WEIGHT": "1"})


# ------------------------------------------------------------------------------------------------
# the classifier, its swap into a network, the criterion


class _FakeMutan(nn.Module):
    """What block's fusions carry that install_deq reads: input_dims, output_dim."""

    def __init__(self, input_dims, output_dim):
        super().__init__()
        self.input_dims, self.output_dim = input_dims, output_dim
        self.lin = nn.Linear(sum(input_dims), output_dim)

    def forward(self, x):
        return self.lin(torch.cat(x, 1))


class _Net(nn.Module):
    """VQANet's shape: forward(batch) -> {'logits': self.fusion([q, v])}."""

    def __init__(self):
        super().__init__()
        self.fusion = _FakeMutan([12, 10], 5)

    def forward(self, batch):
        return {"logits": self.fusion([batch["q"], batch["v"]])}


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(b, 12, generator=g), "v": torch.randn(b, 10, generator=g),
            "class_id": torch.randint(0, 5, (b, 1), generator=g)}


class _CE(nn.Module):  # block's VQACrossEntropyLoss, restated for this test: CE on class_id
    def forward(self, net_out, batch):
        return {"loss": nn.functional.cross_entropy(net_out["logits"], batch["class_id"].squeeze(1))}


def test_install_deq_swaps_the_fusion_and_adds_per_sample_outputs():
    torch.manual_seed(0)
    net = _Net()
    settings = M.Settings(dim=16, options=SMALL)
    head = N.install_deq(net, settings)
    assert net.fusion is head and isinstance(head, DEQClassifier)
    assert head.input_dims == [12, 10] and head.output_dim == 5 and head.n_params > 0
    net.train()
    out = net(_batch())
    assert out["logits"].shape == (6, 5)
    for key in M.SAMPLE_KEYS:
        assert out[key].shape == (6, 1), key            # (B, 1): gathered along the batch, skipped by the logger
    assert head.pop_outputs() == {}                     # the hook took them
    assert torch.all((out["deq_sample_nstep"] >= 1) & (out["deq_sample_nstep"] <= 8))
    assert float(out["deq_sample_jac_loss"][0].detach()) > 0


def test_jacobian_criterion_adds_the_weighted_term_and_gradients_reach_the_fusion():
    torch.manual_seed(1)
    net = _Net()
    N.install_deq(net, M.Settings(dim=16, jac_weight=0.25, options=SMALL))
    crit = C.JacobianLoss(_CE(), 0.25)
    batch = _batch()
    out = net(batch)
    cri = crit(out, batch)
    ce = _CE()(out, batch)["loss"]
    jac = out["deq_sample_jac_loss"].mean()
    assert torch.allclose(cri["loss"], ce + 0.25 * jac)
    assert torch.allclose(cri["loss_vqa"], ce.detach()) and torch.allclose(cri["jac_loss"], jac.detach())
    for key in M.STAT_KEYS:
        assert cri[key].dim() == 0 and math.isfinite(float(cri[key])), key   # what bootstrap's logger records
    cri["loss"].backward()
    grads = [p.grad for p in net.fusion.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) > 0 for g in grads) == len(grads)


def test_in_evaluation_the_jacobian_term_is_zero_and_a_plain_net_passes_through():
    net = _Net()
    N.install_deq(net, M.Settings(dim=16, options=SMALL))
    net.eval()
    with torch.no_grad():
        out = net(_batch())
    assert float(out["deq_sample_jac_loss"].abs().sum()) == 0.0
    plain = _Net()
    out = plain(_batch())
    assert set(out) == {"logits"}
    assert C.JacobianLoss(_CE(), 1.0)(out, _batch())["loss"].shape == ()      # no DEQ outputs: block's loss alone


def test_install_deq_needs_a_block_fusion():
    net = _Net()
    net.fusion = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="input_dims/output_dim"):
        N.install_deq(net, M.Settings(dim=16))


def _fake_upstream(monkeypatch, built, section):
    """block's network/criterion factories and bootstrap's Options/Logger, as sys.modules entries."""
    logged = []

    class Logger:
        def __call__(self, *msg, **kw):
            logged.append(" ".join(map(str, msg)))

        def log_value(self, name, value, **kw):
            logged.append(f"{name}: {value}")

    mods = {
        "block": types.ModuleType("block"), "block.models": types.ModuleType("block.models"),
        "block.models.networks": types.ModuleType("block.models.networks"),
        "block.models.networks.factory": types.SimpleNamespace(factory=lambda engine: built),
        "block.models.criterions": types.ModuleType("block.models.criterions"),
        "block.models.criterions.factory": types.SimpleNamespace(factory=lambda engine, mode: None if mode == "test" else _CE()),
        "bootstrap": types.ModuleType("bootstrap"), "bootstrap.lib": types.ModuleType("bootstrap.lib"),
        "bootstrap.lib.logger": types.SimpleNamespace(Logger=Logger),
        "bootstrap.lib.options": types.SimpleNamespace(Options=lambda: _opts(section)),
    }
    mods["block.models.networks"].factory = mods["block.models.networks.factory"]
    mods["block.models.criterions"].factory = mods["block.models.criterions.factory"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("DEQFUSION_MUTAN_FUSION", raising=False)
    return logged


def test_factories_build_on_blocks_own(monkeypatch):
    net = _Net()
    logged = _fake_upstream(monkeypatch, net, {"fusion": "deq", "dim": 16, "options": SMALL})
    assert N.factory(engine=None) is net and isinstance(net.fusion, DEQClassifier)
    assert any("replaces the _FakeMutan answer fusion" in line for line in logged)
    assert isinstance(C.factory(None, "train"), C.JacobianLoss) and C.factory(None, "test") is None

    plain = _Net()
    logged = _fake_upstream(monkeypatch, plain, {"fusion": "mutan"})
    assert N.factory(engine=None) is plain and isinstance(plain.fusion, _FakeMutan)
    assert isinstance(C.factory(None, "train"), _CE)


# ------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    paths = D.DataPaths.from_root(tmp_path_factory.mktemp("mutan-data"))
    return D.generate(paths, train_images=24, val_images=6, test_images=2)


def test_generated_data_is_in_blocks_layout(generated):
    p = generated.paths
    assert p.vqa_dir.name == "vqa2" and p.rcnn_dir.name == "2018-04-27_bottom-up-attention_fixed_36"
    assert sorted(f.name for f in p.annotations.iterdir()) == sorted(D.ANNOTATION_FILES)
    train_q = json.loads((p.annotations / "OpenEnded_mscoco_train2014_questions.json").read_text())
    train_a = json.loads((p.annotations / "mscoco_train2014_annotations.json").read_text())
    assert train_q["data_subtype"] == "train2014" and len(train_q["questions"]) == generated.counts["train2014"]
    assert [q["question_id"] for q in train_q["questions"]] == [a["question_id"] for a in train_a["annotations"]]
    assert len({q["question_id"] for q in train_q["questions"]}) == len(train_q["questions"])
    answers = Counter(a["multiple_choice_answer"] for a in train_a["annotations"])
    assert len(answers) == generated.nans >= 20                  # block's preprocessing prints the top 20
    for q in train_q["questions"][:5]:
        item = torch.load(p.rcnn_dir / f"COCO_train2014_{q['image_id']:012d}.jpg.pth")
        assert set(item) == {"pooled_feat", "rois", "norm_rois"}
        assert item["pooled_feat"].shape == (36, 2048) and item["pooled_feat"].dtype == torch.float32
        assert item["rois"].shape == (36, 4) and float(item["norm_rois"].max()) <= 1.0 + 1e-6
    names = {f.name for f in p.rcnn_dir.iterdir()}
    assert "COCO_val2014_000000500001.jpg.pth" in names and "COCO_test2015_000000900001.jpg.pth" in names
    dev = json.loads((p.annotations / "OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    test = json.loads((p.annotations / "OpenEnded_mscoco_test2015_questions.json").read_text())
    assert {q["question_id"] for q in dev["questions"]} <= {q["question_id"] for q in test["questions"]}
    assert D.is_generated(p) and D.read_generated(p)["label"] == GENERATED
    D.check(p)                                                    # complete


def test_skipthoughts_standin_has_the_format_and_says_what_it_is(generated):
    st = generated.paths.st_dir
    words = (st / "dictionary.txt").read_text().split("\n")
    assert words[0] == "UNK" and {"how", "many", "color", "dogs", "picture"} <= set(words)
    assert np.load(st / "utable.npy").shape == (len(words) - 1, 620)   # one row per dictionary line
    npz = np.load(st / "uni_skip.npz")
    shapes = {k: npz[k].shape for k in npz.files}
    assert shapes == {"encoder_W": (620, 4800), "encoder_b": (4800,), "encoder_U": (2400, 4800),
                      "encoder_Wx": (620, 2400), "encoder_bx": (2400,), "encoder_Ux": (2400, 2400)}
    note = json.loads((st / D.MARKER).read_text())
    assert note["label"] == GENERATED and "NOT the pretrained" in note["what"]


def test_extra_questions_ask_about_the_image():
    scenes = vqa2.make_scenes(30, seed=2)
    extra = D.extra_questions(scenes, seed=2, noise=0.0)
    by_image = {s.image_id: s for s in scenes}
    for q in extra:
        scene = by_image[q.image_id]
        if q.question == "How many objects are there?":
            assert q.multiple_choice_answer == str(sum(n for _, _, n in scene.objects))
        else:
            colour = q.question.split()[3]
            assert [o for o, c, _ in scene.objects if c == colour] == [q.multiple_choice_answer]
    assert len({q.question_id for q in D.all_questions(scenes)}) == len(D.all_questions(scenes))


def test_too_few_images_and_missing_data_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="at least 20"):
        D.generate(D.DataPaths.from_root(tmp_path / "tiny"), train_images=2, val_images=1, test_images=1)
    with pytest.raises(D.DataError) as err:
        D.check(D.DataPaths.from_root(tmp_path / "empty"), clone=tmp_path / "clone")
    msg = str(err.value)
    assert "download_vqa2.sh" in msg and "mscoco_train2014_annotations.json" in msg and "--generated" in msg


# ------------------------------------------------------------------------------------------------
# options files, the runner's command, waiting for block's evaluations


def test_options_files_ship_with_the_package():
    base, deq = O.path("mutan"), O.path("mutan_deq.yaml")
    assert base.is_absolute() and deq.parent == base.parent
    text = base.read_text()
    fusion_types = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.strip().startswith("type:")]
    assert fusion_types == ["type: BayesianUniSkip", "type: mutan", "type: mutan"] and "block_tucker" in text   # fixed, and says what it was
    assert "__include__: mutan.yaml" in deq.read_text()
    with pytest.raises(ValueError, match="mutan_deq"):
        O.path("tucker")
    out = subprocess.run([sys.executable, "-m", "deqfusion.adapters.mutan.options", "mutan"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(base)


def test_runspec_command(tmp_path):
    paths = D.DataPaths.from_root(tmp_path)
    spec = R.RunSpec(row="mutan_deq", exp_dir=tmp_path / "x", data=paths, nans=21, epochs=1, quick=True,
                     grad_log=True, flags=["--model.network.deq.jac_weight", "0.5"])
    cmd = spec.command()
    assert cmd[1:5] == ["-m", "deqfusion.adapters.mutan.run", "-o", str(O.path("mutan_deq"))]
    joined = " ".join(cmd)
    for part in ("--misc.cuda False", "--dataset.nans 21", "--model.network.classif.fusion.output_dim 21",
                 "--engine.nb_epochs 1", "--dataset.nb_threads 0", "--model.network.deq.dim 64",
                 f"--dataset.dir {paths.vqa_dir}", "--deqfusion-grad-log", "--model.network.deq.jac_weight 0.5"):
        assert part in joined, part
    base = R.RunSpec(row="mutan", exp_dir=tmp_path / "y", data=paths, quick=True).command()
    assert "--model.network.deq.dim" not in base and "--dataset.nans" not in base


def test_wait_for_evaluations_waits_for_blocks_background_processes(tmp_path):
    (tmp_path / "results" / "val" / "epoch,0").mkdir(parents=True)
    (tmp_path / "logs_val_oe.json").write_text(json.dumps({"eval_epoch.epoch": [0], "eval_epoch.overall": [40.0]}))

    def finish():
        time.sleep(0.6)
        (tmp_path / "results" / "val" / "epoch,0").rmdir()

    t0 = time.monotonic()
    threading.Thread(target=finish).start()
    values = R.wait_for_evaluations(tmp_path, epochs=1, timeout=20)
    assert 0.5 < time.monotonic() - t0 < 15 and values["eval_epoch.overall"] == [40.0]
    t0 = time.monotonic()
    assert R.wait_for_evaluations(tmp_path, epochs=2, timeout=1.0)["eval_epoch.epoch"] == [0]   # gives up
    assert time.monotonic() - t0 >= 1.0


def test_run_refuses_an_existing_experiment_folder_and_a_missing_clone(tmp_path):
    clone = tmp_path / "clone"
    (clone / "block" / "models" / "networks").mkdir(parents=True)
    (clone / "block" / "models" / "networks" / "vqa_net.py").write_text("")
    (tmp_path / "exp").mkdir()
    spec = R.RunSpec(row="mutan", exp_dir=tmp_path / "exp", data=D.DataPaths.from_root(tmp_path))
    with pytest.raises(R.UpstreamError, match="exists"):
        R.run(spec, clone)
    with pytest.raises(R.UpstreamError, match="apply_patches.sh mutan"):
        R.check_upstream(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------
# deqfusion reproduce mutan


def _fake_result(overall):
    return {"best_epoch": 1, "oe": {"yes/no": 70.0, "number": 30.0, "other": 40.5, "overall": overall}}


def test_table5_generated_labels_every_number_and_keeps_the_paper_beside():
    text = P.render_table({"mutan": _fake_result(50.0), "mutan_deq": _fake_result(51.25)}, True, "generated")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| Mutan on VQA-v2 | Yes/no | Number | Other | Overall |"
    ours = [ln for ln in lines if "ours" in ln]
    assert len(ours) == 2
    for ln in ours:
        cells = [c.strip() for c in ln.strip("|").split("|")][1:]
        assert len(cells) == 4 and all(c.endswith(f"({GENERATED})") for c in cells)
    assert "| Mutan — paper (VQA-v2) | 82.40 | 42.63 | 54.85 | 63.73 |" in text
    assert "| + DEQ — paper (VQA-v2) | 82.91 | 45.40 | 55.70 | 64.57 |" in text
    real = P.render_table({"mutan": _fake_result(50.0)}, False, "VQA-v2")
    assert GENERATED not in real and "| Mutan — ours (epoch 1, best val top-1) | 70.00 | 30.00 | 40.50 | 50.00 |" in real


def test_reproduce_cli(tmp_path, capsys):
    from deqfusion import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["reproduce", "mutan", "--help"])
    assert done.value.code == 0 and "--generated" in capsys.readouterr().out
    assert cli.main(["reproduce", "mutan", "--upstream", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "apply_patches.sh mutan" in capsys.readouterr().err
    clone = tmp_path / "clone"
    (clone / "block" / "models" / "networks").mkdir(parents=True)
    (clone / "block" / "models" / "networks" / "vqa_net.py").write_text("")
    assert cli.main(["reproduce", "mutan", "--upstream", str(clone), "--out", str(tmp_path / "o")]) == 2
    assert "download_vqa2.sh" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError, match="f_max_iter"):
        P._option("f_thres=3")
    assert P._option("f_max_iter=30") == ("f_max_iter", "30")


def test_run_entry_takes_our_option_names_and_its_own_flag():
    from deqfusion.adapters.mutan import run

    assert run._resolve_options(["-o", "mutan_deq", "--exp.dir", "x"]) == ["-o", str(O.path("mutan_deq")), "--exp.dir", "x"]
    assert run._resolve_options(["--path_opts=mutan"]) == [f"--path_opts={O.path('mutan')}"]
    assert run._resolve_options(["-o", "logs/x/options.yaml"]) == ["-o", "logs/x/options.yaml"]   # bootstrap's own
    assert run._split_grad_log(["-o", "a", "--deqfusion-grad-log", "g.json", "--b", "1"]) == (["-o", "a", "--b", "1"], "g.json")
    assert run._split_grad_log(["--deqfusion-grad-log=g.json"]) == ([], "g.json")
