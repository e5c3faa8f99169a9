"""The CM-BERT patch against the real upstream at its pinned commit, and its own run_classifier.main on CPU.

Needs a local mirror of thuiar/Cross-Modal-BERT: set DEQFUSION_MIRROR to a clone (or a bare snapshot,
or a folder holding one as `cmbert` / `thuiar+Cross-Modal-BERT`); the tests skip with that reason
when there is none.  They also need the [cmbert] extra (pytorch-pretrained-bert, transformers,
matplotlib, scikit-learn), and skip naming it when it is missing.

The training-loop test runs `deqfusion reproduce cmbert` once (baseline and DEQ, one epoch each, on
the first 96/24/24 rows of the real CMU-MOSI text, a small random BERT in CM-BERT's format; the
audio pickle is generated where the mirror lacks it) and checks what the upstream printed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deqfusion.adapters import cmbert as A
from deqfusion.adapters.cmbert import convert as C
from deqfusion.adapters.cmbert import data as D
from deqfusion.adapters.cmbert import runner as R
from helpers_upstream import mirror_clone, git

pytestmark = pytest.mark.mirror

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches" / "cmbert").glob("*.patch"))
PIN = R.UPSTREAM_COMMIT
ROWS = (96, 24, 24)
FAST = ["--option", "f_max_iter=30", "--option", "b_max_iter=30"]


def _need_extra():
    for mod in ("pytorch_pretrained_bert", "transformers", "matplotlib", "sklearn", "requests"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed: pip install -e '.[cmbert]' (after torch) runs CM-BERT's code")


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """(pristine, patched) checkouts of the pin. The audio pickle is left out of the checkout when the
    mirror lacks its blob (snapshots without files of 4 MiB or more)."""
    mirror = mirror_clone("cmbert", PIN)
    blob = git(mirror, "rev-parse", f"{PIN}:{D.AUDIO_FILE.as_posix()}").strip()
    has_pickle = subprocess.run(["git", "-C", str(mirror), "cat-file", "-e", blob], capture_output=True).returncode == 0
    out = {}
    for name in ("pristine", "patched"):
        dst = tmp_path_factory.mktemp("cmbert") / name
        git(dst.parent, "clone", "-q", "--no-checkout", str(mirror), str(dst))
        git(dst, "sparse-checkout", "set", "--no-cone", "/*", *([] if has_pickle else ["!" + D.AUDIO_FILE.as_posix()]))
        subprocess.run(["git", "-C", str(dst), "checkout", "-q", "-b", "deqfusion", PIN], capture_output=True)
        assert (dst / "model.py").is_file() and (dst / "run_classifier.py").is_file()
        assert git(dst, "rev-parse", "HEAD").strip() == PIN
        out[name] = dst
    for patch in PATCHES:
        git(out["patched"], "apply", "--check", str(patch))
        git(out["patched"], "apply", str(patch))
    out["has_pickle"] = has_pickle
    return out


def test_the_real_text_split_is_at_the_pin(clones):
    text = D.check_text(clones["pristine"] / D.TEXT_DIR)
    assert [len(D.labels(text / f"{s}.tsv")) for s in D.SPLITS] == [1284, 229, 686]
    ys = np.asarray(D.labels(text / "train.tsv"))
    assert ys.min() >= -3 and ys.max() <= 3


def test_patch_adds_four_lines_to_model_py_only(clones):
    assert PATCHES, "no patches/cmbert/*.patch"
    stat = git(clones["patched"], "diff", "--numstat").split()
    assert stat == ["4", "0", "model.py"], stat                      # 4 insertions, 0 deletions, one file
    text = (clones["patched"] / "model.py").read_text(encoding="utf-8")
    assert "self.fusion = deq_adapter.build_fusion()" in text
    assert "fusion_att =text_weight_1*text_att1 + audio_weight_1*audio_att + bias" in text  # the sum stays
    pristine_rc = (clones["pristine"] / "run_classifier.py").read_bytes()
    assert (clones["patched"] / "run_classifier.py").read_bytes() == pristine_rc           # untouched
    assert b'os.environ["CUDA_VISIBLE_DEVICES"]="1"' in pristine_rc and b"n_gpu = 2" in pristine_rc
    assert b"logits,_,_ = model(" in pristine_rc                                            # three values unpacked


def _load(clone: Path, alias: str):
    """Import a clone's model.py under another name (its `from utils import *` needs the clone on sys.path)."""
    saved = {k: sys.modules.pop(k) for k in ("utils",) if k in sys.modules}
    sys.path.insert(0, str(clone))
    try:
        spec = importlib.util.spec_from_file_location(alias, clone / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(clone))
        sys.modules.pop("utils", None)
        sys.modules.update(saved)
    return mod


def _tiny_config(mod, vocab=60):
    # hidden 768 is hard-coded in BertFinetun; CM-BERT builds num_attention_heads layers (here 1)
    return mod.BertConfig(vocab, hidden_size=768, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32)


def _inputs(batch=4, seq=50, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, 20:] = 0
    audio = torch.randn(batch, seq, 5, generator=g)
    labels = torch.randn(batch, generator=g)
    return ids, audio, torch.zeros_like(ids), mask, labels


def test_sum_setting_is_exactly_the_upstream_model(clones):
    _need_extra()
    pristine = _load(clones["pristine"], "cmbert_model_pristine")
    patched = _load(clones["patched"], "cmbert_model_patched")
    torch.manual_seed(5)
    up = pristine.BertForSequenceClassification(_tiny_config(pristine), 1)
    with A.configure(fusion="sum"):
        torch.manual_seed(5)
        ours = patched.BertForSequenceClassification(_tiny_config(patched), 1)
    assert ours.BertFinetun.fusion is None
    sd_up, sd_ours = up.state_dict(), ours.state_dict()
    assert list(sd_up) == list(sd_ours) and all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_up)
    ids, audio, seg, mask, labels = _inputs()
    torch.manual_seed(3)
    loss_up = up(ids, audio, seg, mask, labels)
    loss_up.mean().backward()
    torch.manual_seed(3)
    loss_ours = ours(ids, audio, seg, mask, labels)
    loss_ours.mean().backward()
    assert torch.equal(loss_up, loss_ours)
    for (k, p), q in zip(up.named_parameters(), ours.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), k
    up.eval()
    ours.eval()
    with torch.no_grad():
        out_up, out_ours = up(ids, audio, seg, mask), ours(ids, audio, seg, mask)
    assert len(out_ours) == 3 and all(torch.equal(a, b) for a, b in zip(out_up, out_ours))


def test_deq_setting_trains_the_fusion_under_bertfinetun_and_keeps_three_outputs(clones):
    _need_extra()
    patched = _load(clones["patched"], "cmbert_model_patched2")
    with A.configure(fusion="deq", options={"f_max_iter": 15, "b_max_iter": 15}):
        model = patched.BertForSequenceClassification(_tiny_config(patched), 1)
    fusion = model.BertFinetun.fusion
    assert isinstance(fusion, A.CMBertFusion)
    names = [n for n, _ in model.named_parameters() if ".fusion." in n]
    assert names and all(n.startswith("BertFinetun.fusion.deq.") for n in names)  # unfrozen, lr-0.01 group by name
    # CM-BERT's init_bert_weights (N(0, 0.02), zero bias) did not redraw the core's channel maps
    lin = fusion.deq.modality_blocks[0].lin1
    assert float(lin.bias.abs().sum()) > 0 and float(lin.weight.std()) > 0.05
    ids, audio, seg, mask, labels = _inputs()
    loss = model(ids, audio, seg, mask, labels)
    assert loss.shape == (4,) and fusion.last_jac_loss is not None and fusion.pending_loss is None  # taken by the loss
    loss.mean().backward()
    grads = [p.grad for p in fusion.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    with torch.no_grad():
        out = model(ids, audio, seg, mask)
    assert len(out) == 3 and out[0].shape == (4, 1) and out[2].shape == (4, 50, 50)


def test_converted_transformers_weights_give_cmberts_model_the_same_hidden_states(clones, tmp_path):
    _need_extra()
    import transformers

    pristine = _load(clones["pristine"], "cmbert_model_pristine3")
    vocab = list(C.SPECIAL_TOKENS) + [f"w{i}" for i in range(35)]
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                  intermediate_size=24, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    with torch.no_grad():                    # non-trivial LayerNorm parameters and biases, so a mix-up shows
        for name, p in hf.named_parameters():
            if name.endswith(("LayerNorm.weight", "LayerNorm.bias", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    (src / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    out = C.convert(str(src), tmp_path / "cmbert-bert", offline=True, any_size=True)   # the command's own path
    assert json.loads((out / C.CONFIG_NAME).read_text())["num_hidden_layers"] == 3
    assert (out / C.VOCAB_NAME).read_text().split("\n")[:6] == vocab[:6]
    cm = pristine.BertModel.from_pretrained(str(out)).eval()                    # CM-BERT's own class and loader
    assert len(cm.encoder.layer) == 3
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(vocab), (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    seg = torch.zeros_like(ids)
    seg[2, 8:] = 1
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=seg)
        seq, pooled, _ = cm(ids, torch.zeros(3, 17, 5), seg, mask)
    assert torch.allclose(seq, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pooled, want.pooler_output, atol=1e-5, rtol=1e-5)


def test_import_keeps_the_callers_cuda_visible_devices(clones, monkeypatch):
    _need_extra()
    R._loaded.pop(clones["patched"].resolve(), None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    rc = R.load_upstream(clones["patched"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and hasattr(rc, "main")
    assert "model" not in sys.modules or getattr(sys.modules["model"], "__file__", "") != str(clones["patched"] / "model.py")


@pytest.fixture(scope="module")
def reproduced(clones, tmp_path_factory):
    """`deqfusion reproduce cmbert` once: simple addition and DEQ through run_classifier.main, one epoch."""
    _need_extra()
    from deqfusion.cli import main

    out = tmp_path_factory.mktemp("cmbert-reproduce")
    threads = torch.get_num_threads()
    try:
        rc = main(["reproduce", "cmbert", "--random-bert", "--epochs", "1", "--rows", ",".join(map(str, ROWS)),
                   "--seeds", "1", "--jobs", "1", "--threads", "1", "--quiet", "--upstream", str(clones["patched"]),
                   "--out", str(out), *FAST])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    return out, results, {r["row"]: r for r in results["runs"]}


def test_upstream_loop_trains_both_and_prints_its_metrics(reproduced):
    out, results, runs = reproduced
    assert set(runs) == {"sum", "deq:full"}
    for key, run in runs.items():
        log = (out / "logs" / f"{key.replace(':', '-')}-seed0.log").read_text()
        assert "***** Running training *****" in log and "***** test results *****" in log
        for metric in ("acc", "F1", "mae", "corr", "acc7"):                          # Acc-2, F1, MAE, Corr, Acc-7
            assert f"  {metric} = " in log, (key, metric)
            assert np.isfinite(run["metrics"][metric]), (key, metric)
        assert run["data"]["rows"] == dict(zip(D.SPLITS, ROWS))
        assert run["train_steps"] == 4 and run["epochs_trained"] == 1 and run["models_built"] == 2
        assert len(run["dev_history"]) == 1 and np.isfinite(run["dev_history"][0]["eval_loss"])  # dev-loss selection
        assert np.isfinite(run["metrics"]["test_loss"]) and np.isfinite(run["metrics"]["loss"])
        g = run["grad_stats"]
        assert g["backward_passes"] == 4 and g["params_with_grad"] == g["params"] > 0 and g["all_finite"]
        assert g["param_change"] > 0                                                    # the optimiser moved them
        assert run["upstream_seed"] == int(np.random.RandomState(0).randint(1, 10000))
    assert runs["sum"]["grad_stats"]["param_names"] == ["text_weight_1", "audio_weight_1", "bias"]
    assert runs["sum"]["fusion_stats"] == {}


def test_deq_solver_statistics_are_in_the_log(reproduced):
    out, _, runs = reproduced
    deq = runs["deq:full"]
    log = (out / "logs" / "deq-full-seed0.log").read_text()
    for phase in ("train", "dev", "test"):
        assert f"DEQ fusion [{phase}]" in log
    assert "jac loss" in log and "solver steps" in log
    stats = deq["fusion_stats"]
    assert stats["train"]["samples"] == ROWS[0] and stats["train"]["nstep_max"] <= 30
    assert stats["dev"]["samples"] == 2 * ROWS[1]                    # the dev loop calls the model twice per batch
    assert stats["test"]["samples"] == 2 * ROWS[2]
    assert sum(stats["test"]["status"].values()) == 2 * ROWS[2] and stats["test"]["status"]["non_finite"] == 0
    assert np.isfinite(stats["train"]["jac_loss_last"])
    assert any(n.startswith("deq.fusion_block.") for n in deq["grad_stats"]["param_names"])


def test_every_number_is_labelled_and_generated_audio_is_said(reproduced, clones):
    out, results, runs = reproduced
    table = (out / "table.md").read_text()
    ours = [line for line in table.splitlines() if line.startswith("| CM-BERT") and "paper" not in line]
    assert len(ours) == 2 and all(C.RANDOM_BERT in line for line in ours)
    assert "| CM-BERT (simple addition) — paper | 44.9 | 84.5 | 84.5 | 0.729 | 0.791 |" in table
    assert C.RANDOM_BERT in results["labels"]
    for run in runs.values():
        assert run["data"]["bert_source"]["kind"] == "random"
        assert run["data"]["audio_generated"] is (not clones["has_pickle"])
    if not clones["has_pickle"]:
        assert "generated data, not a result" in table
        log = (out / "logs" / "sum-seed0.log").read_text()
        assert "MOSI_cmu_audio_CLS.pickle is missing" in log and "generated data, not a result" in log
