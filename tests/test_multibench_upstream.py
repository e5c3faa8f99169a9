"""The MultiBench patch against the real upstream at its pinned commit: the series applies, the upstream's
own loader imports (dead imports stood in) and reads the generated file, and MultiBench's own train() and
test() run the patched example on CPU for the late-fusion baseline and for DEQ fusion.

Needs a mirror of pliang279/MultiBench: DEQFUSION_MIRROR (a clone, a bare snapshot, or a folder holding one as
`multibench` / `pliang279+MultiBench`); the tests skip with that reason without one.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from deqfusion.adapters import multibench as A
from deqfusion.adapters.common import import_standins as S
from deqfusion.adapters.common.report import GENERATED
from deqfusion.adapters.multibench import data as D
from deqfusion.adapters.multibench import runner as R
from helpers_upstream import git

pytestmark = [pytest.mark.mirror, pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")]

ROOT = Path(__file__).resolve().parents[1]
PIN = R.UPSTREAM_COMMIT


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The series applied to the pinned commit by the project's own apply command, from the mirror."""
    from deqfusion.upstream.manifest import load_manifest
    from deqfusion.upstream.sources import MIRROR_ENV, find_in_mirror

    env = os.environ.get(MIRROR_ENV)
    if not env:
        pytest.skip(f"no mirror of pliang279/MultiBench: set {MIRROR_ENV} to a clone or a folder of clones")
    entry = load_manifest().get("multibench")
    mirror = find_in_mirror(entry, Path(env))
    if mirror is None:
        pytest.skip(f"{MIRROR_ENV}={env} holds no clone of pliang279/MultiBench")
    from deqfusion.upstream.cli import main

    dest = tmp_path_factory.mktemp("upstream") / "multibench"
    assert main(["apply", "multibench", "--source", str(mirror), "--dest", str(dest)]) == 0
    assert git(dest, "rev-parse", "HEAD~1").strip() == PIN
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return D.generate(tmp_path_factory.mktemp("mmimdb") / D.FILE_NAME, n_train=64, n_dev=16, n_test=16, seed=0)


def test_patch_touches_only_the_example(clone):
    changed = git(clone, "diff", "--name-only", PIN, "HEAD").split()
    assert changed == [R.EXAMPLE]
    text = (clone / R.EXAMPLE).read_text()
    assert "deq_adapter.build_fusion(Concat(), [512, 512])" in text and "fusion = Concat().cuda()" not in text
    assert "objective=deq_adapter.objective(torch.nn.BCEWithLogitsLoss()), objective_args_dict={}" in text
    # the training structure is the upstream's, with the injection points this integration relies on
    sl = (clone / "training_structures" / "Supervised_Learning.py").read_text()
    assert "op = optimtype([p for p in model.parameters() if p.requires_grad] +" in sl
    assert "objective_args_dict['fused'] = model.fuseout" in sl and "if type(out) is tuple:" in sl
    gd = (clone / "datasets" / "imdb" / "get_data.py").read_text()
    assert "from gensim.models import KeyedVectors" in gd and "from .vgg import VGGClassifier" in gd
    assert "IMDBDataset(path, 0, 15552, vgg)" in gd and "IMDBDataset(path, 18160, 25959, vgg)" in gd


@contextlib.contextmanager
def _upstream(clone):
    """Import the clone's loader and models inside the runner's contexts (stand-ins, sys.path)."""
    with S.stand_ins(A.STANDINS), R.upstream_imports(clone):
        yield


def test_loader_imports_and_its_robust_path_raises_a_clear_error(clone, tiny):
    with _upstream(clone):
        gd = importlib.import_module("datasets.imdb.get_data")
        assert S.is_stand_in(gd.KeyedVectors)
        # get_dataloader's robustness path (no_robust=False, the unpatched example's default) calls VGG-16 (blocks)
        with pytest.raises(S.StandInError, match=r"datasets\.imdb\.vgg\.VGGNet \(a subclass of the stand-in "
                                                 r"blocks\.bricks\.FeedforwardSequence\) was called, but 'blocks' is "
                                                 r"not installed here.*no_robust=False"):
            gd.get_dataloader(str(tiny), "../video/mmimdb", num_workers=0, vgg=True, batch_size=8)
        with pytest.raises(S.StandInError, match=r"gensim\.models\.KeyedVectors\.load_word2vec_format was called, "
                                                 r"but 'gensim' is not installed"):
            gd.KeyedVectors.load_word2vec_format("GoogleNews-vectors-negative300.bin.gz", binary=True)
        cm = importlib.import_module("unimodals.common_models")
        if S.is_stand_in(cm.torchvision):
            with pytest.raises(S.StandInError, match=r"torchvision\.models\.vgg16_bn was called, but 'torchvision'"):
                cm.VGG16(512)
    assert "datasets" not in sys.modules and "gensim" not in sys.modules


def test_no_robust_loader_reads_the_generated_file_in_its_own_split(clone, tiny):
    info = D.check_file(tiny)
    with _upstream(clone):
        gd = importlib.import_module("datasets.imdb.get_data")
        with R._patched_attrs(gd, IMDBDataset=R.remapped_dataset(gd.IMDBDataset, info.splits)):
            train, valid, test = gd.get_dataloader(str(tiny), "unused", num_workers=0, vgg=True, batch_size=50,
                                                   no_robust=True)
        assert [len(dl.dataset) for dl in (train, valid, test)] == [64, 16, 16]
        text, image, label = next(iter(valid))
        assert text.shape == (16, 300) and image.shape == (16, 4096) and label.shape == (16, 23)
        assert str(text.dtype) == "torch.float32" and str(label.dtype) == "torch.int32"
        import h5py

        with h5py.File(tiny, "r") as f:  # dev rows are rows 64..79 of the file
            assert (image.numpy() == f["vgg_features"][64:80]).all()


@pytest.fixture(scope="module")
def runs(clone, tiny, tmp_path_factory):
    """The patched example through MultiBench's own train()/test(): late fusion and DEQ fusion, 2 epochs each."""
    out = {}
    for name, settings in (("concat", A.Settings(fusion="concat")),
                           ("deq", A.Settings(options={"f_max_iter": 6, "b_max_iter": 6}))):
        spec = R.RunSpec(tiny, seed=0, settings=settings, epochs=2, batch_size=32, num_workers=0, device="cpu",
                         threads=1)
        out[name] = R.run(spec, clone, workdir=tmp_path_factory.mktemp(name))
    return out


@pytest.mark.parametrize("name", ["concat", "deq"])
def test_example_trains_through_multibenchs_own_loop(runs, name):
    res = runs[name]
    log = res.upstream_log
    for line in ("Epoch 0 train loss:", "Epoch 1 valid loss:", "Saving Best", "Training Time:", "Testing:",
                 "Inference Time:"):
        assert line in log, line  # MultiBench's own prints
    assert res.epochs_trained == 2 and [h["epoch"] for h in res.history] == [0, 1] and res.train_process_runs >= 1
    losses = [h["train_loss"] for h in res.history] + [h["valid_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses), losses
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"], res.history  # learnable signal
    assert 0 <= res.metrics["micro"] <= 100 and 0 <= res.metrics["macro"] <= 100 and res.best_epoch is not None
    assert res.splits == {"train": [0, 64], "dev": [64, 80], "test": [80, 96]}
    assert res.settings["loader"]["no_robust"] is True and res.settings["loader"]["batch_size"] == 32
    assert "datasets" not in sys.modules and "training_structures" not in sys.modules
    assert not any(S.is_stand_in(m) for m in sys.modules.values())


def test_baseline_is_the_upstream_late_fusion(runs):
    res = runs["concat"]
    assert res.param_groups == [{"name": "group 0", "lr": 8e-3, "weight_decay": 0.01, "parameters": 10_311_279}]
    assert res.fusion_grad["parameters"] == 0 and not res.fusion_phases and "[deqfusion]" not in res.upstream_log
    assert "Training Params: 10311279" in res.upstream_log  # MaxOut encoders + Linear(1024, 23), Concat has none


def test_deq_fusion_trains_with_its_own_learning_rate_and_reports_the_solver(runs):
    res = runs["deq"]
    groups = {g["name"]: g for g in res.param_groups}
    assert groups["encoders+head"]["lr"] == 1e-3 and groups["fusion"]["lr"] == 1e-4
    # encoders as in the baseline, head Linear(512, 23) instead of Linear(1024, 23)
    assert groups["encoders+head"]["parameters"] == 10_311_279 - 1024 * 23 + 512 * 23
    grad = res.fusion_grad
    assert grad["parameters"] > 0 and grad["with_grad"] == grad["parameters"] == grad["nonzero"]
    assert grad["finite"] and grad["grad_norm"] > 0
    phases = res.fusion_phases
    assert [p["phase"] for p in phases] == ["train", "eval"] * 2
    train = phases[0]
    assert train["samples"] == 64 and train["batches"] == 2 and 1 <= train["nstep_max"] <= 6
    assert train["backward"]["batches"] == 2 and math.isfinite(train["jac_loss_mean"]) and train["jac_loss_mean"] >= 0
    assert res.fusion_test["phase"] == "eval" and res.fusion_test["samples"] == 16
    assert "[deqfusion] DEQ fusion, train phase 1 (2 batches, 64 samples): forward steps mean" in res.upstream_log
    assert "backward steps mean" in res.upstream_log and "jac loss" in res.upstream_log
    assert res.settings["fusion_kwargs"] == {"f_max_iter": 6, "b_max_iter": 6, "ablation": "full"}


def test_reproduce_generated_end_to_end(clone, tmp_path):
    from deqfusion.cli import main

    out = tmp_path / "out"
    code = main(["reproduce", "multibench", "--generated", "--gen-sizes", "64,16,16", "--epochs", "1",
                 "--ablation", "no_gate", "--option", "f_max_iter=4", "--option", "b_max_iter=4", "--upstream",
                 str(clone), "--out", str(out), "--device", "cpu", "--threads", "1", "--jobs", "1", "--quiet"])
    assert code == 0
    table = (out / "table.md").read_text()
    ours = [ln for ln in table.splitlines() if ln.startswith("| ") and "— paper" not in ln and "method" not in ln]
    assert len(ours) == 2 and all(f"| {GENERATED} |" in ln for ln in ours)
    assert "paper Table 8 rows" in table and "DEQ fusion without gate (purify removed)" in table
    assert "| Late fusion (MultiBench: concatenation) — paper | paper, MM-IMDB | 59.02 | 50.27 |" in table
    res = json.loads((out / "results.json").read_text())
    assert res["generated"] and [r["row"] for r in res["runs"]] == ["concat", "deq:no_gate"]
    assert res["runs"][1]["settings"]["fusion_kwargs"]["ablation"] == "no_gate"
    assert len(list((out / "logs").glob("*.log"))) == 2
    # the generated file is refused as real data
    code = main(["reproduce", "multibench", "--data", str(out / "generated" / D.FILE_NAME), "--upstream", str(clone),
                 "--out", str(tmp_path / "o2"), "--quiet"])
    assert code == 2
