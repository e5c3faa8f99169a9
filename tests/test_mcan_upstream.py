"""The MCAN patch against the real upstream at its pinned commit, and MCAN's own run.py on CPU.

Needs a local mirror of MILVLG/mcan-vqa: DEQFUSION_MIRROR set to a clone, or a folder holding one as
``mcan`` / ``MILVLG+mcan-vqa`` (optionally in ``repo/``); the tests skip with that reason otherwise.
The training runs use generated data of MCAN's exact layout, a tiny model (runner.tiny_overrides:
entries added to cfgs/large_model.yml) and the stand-in word vectors unless spaCy 2's are installed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from deqfusion.adapters import mcan as A
from deqfusion.adapters.common.report import GENERATED
from deqfusion.adapters.mcan import compat, data as D, runner as R
from helpers_upstream import mirror_clone, git

pytestmark = [
    pytest.mark.mirror,
    # MCAN's 2019 code: regex strings with invalid escapes; pin_memory=True on a machine without CUDA
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches" / "mcan").glob("*.patch"))
PIN = R.UPSTREAM_COMMIT


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """(pristine, patched) checkouts of the pinned commit (the 250 kB figure under misc/ left out)."""
    mirror = mirror_clone("mcan", PIN)
    out = {}
    for name in ("pristine", "patched"):
        dst = tmp_path_factory.mktemp("mcan") / name
        git(dst.parent, "clone", "-q", "--no-checkout", str(mirror), str(dst))
        git(dst, "sparse-checkout", "set", "--no-cone", "/*", "!misc/")
        git(dst, "checkout", "-q", "-b", "deqfusion", PIN)
        assert git(dst, "rev-parse", "HEAD").strip() == PIN
        out[name] = dst
    for patch in PATCHES:
        git(out["patched"], "apply", "--check", str(patch))
        git(out["patched"], "apply", str(patch))
    return out


def test_patch_touches_the_fusion_call_constructor_and_loss_line_only(clones):
    assert PATCHES, "no patches/mcan/*.patch"
    assert git(clones["patched"], "diff", "--name-only").split() == ["core/exec.py", "core/model/net.py"]
    stat = git(clones["patched"], "diff", "--numstat").split()
    assert sum(int(x) for x in stat[0::3]) == 5 and sum(int(x) for x in stat[1::3]) == 2   # 5 lines in, 2 out
    net = (clones["patched"] / "core/model/net.py").read_text()
    assert "proj_feat = lang_feat + img_feat" not in net
    assert "proj_feat = deq_adapter.fuse(self.fusion, lang_feat, img_feat)\n        proj_feat = self.proj_norm(proj_feat)" in net
    exe = (clones["patched"] / "core/exec.py").read_text()
    assert "loss = loss_fn(pred, sub_ans_iter) + deq_adapter.jac_term(net)" in exe
    # the facts the adapter relies on, at the pin
    pristine = clones["pristine"]
    assert "torch.nn.BCELoss(reduction='sum')" in (pristine / "core/exec.py").read_text()
    assert "net.eval()" in (pristine / "core/exec.py").read_text()
    assert "no_grad" not in (pristine / "core/exec.py").read_text()
    assert "FLAT_OUT_SIZE: 2048" in (pristine / "cfgs/large_model.yml").read_text()
    assert "yaml.load(f)" in (pristine / "run.py").read_text()


def _nets(clone: Path, settings: A.Settings, seed: int = 7):
    """MCAN's Net built from the clone's own Cfgs (large + tiny entries), as Execution builds it."""
    import numpy as np

    with compat.process_state(str(clone), ["run.py"]):
        os.chdir(clone)
        from cfgs.base_cfgs import Cfgs  # noqa: PLC0415 - the clone's
        from core.model.net import Net  # noqa: PLC0415

        cfg = Cfgs()
        cfg.add_args({"LAYER": 6, "HIDDEN_SIZE": 1024, "FLAT_OUT_SIZE": 2048, "GRAD_ACCU_STEPS": 2,
                      **R.tiny_overrides(24), "RUN_MODE": "train", "SEED": seed})
        cfg.proc()
        emb = np.random.RandomState(0).randn(20, cfg.WORD_EMBED_SIZE).astype(np.float32)
        with A.configure(settings):
            torch.manual_seed(seed)
            net = Net(cfg, emb, 20, 30)
    return net


def _inputs():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(4, 16, 24, generator=g)
    img[:, 12:] = 0                                          # padded boxes (MCAN masks all-zero rows)
    ques = torch.randint(1, 20, (4, 14), generator=g)
    ques[:, 9:] = 0
    return img, ques


def test_sum_setting_is_exactly_the_upstream_model(clones):
    up = _nets(clones["pristine"], A.Settings(fusion="sum"))
    ours = _nets(clones["patched"], A.Settings(fusion="sum"))
    assert ours.fusion is None
    sd_up, sd_ours = up.state_dict(), ours.state_dict()
    assert list(sd_up) == list(sd_ours) and all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_up)
    img, ques = _inputs()
    out_up, out_ours = up(img, ques), ours(img, ques)
    assert torch.equal(out_up, out_ours)
    out_up.sum().backward()
    out_ours.sum().backward()
    for (k, p), q in zip(up.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), k


def test_deq_setting_keeps_the_upstream_layers_and_adds_the_fusion(clones):
    up = _nets(clones["pristine"], A.Settings(fusion="sum"))
    ours = _nets(clones["patched"], A.Settings(options={"f_max_iter": 6, "b_max_iter": 6}))
    assert ours.fusion is not None and ours.fusion.deq.config.dim == 64
    sd_up, sd_ours = up.state_dict(), ours.state_dict()
    assert set(sd_ours) - set(sd_up) == {k for k in sd_ours if k.startswith("fusion.")}
    assert all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_up)   # built after them: same initial weights
    img, ques = _inputs()
    pred = ours(img, ques)
    assert pred.shape == (4, 30) and ((pred > 0) & (pred < 1)).all()
    assert A.jac_term(ours).requires_grad


# ------------------------------------------------------------------------------------------------
# MCAN's own run.py, baseline and DEQ fusion, through `deqfusion reproduce mcan --generated`

EPOCHS = 3
TEST_MODEL = {"HIDDEN_SIZE": 32, "FLAT_MLP_SIZE": 32, "FLAT_OUT_SIZE": 32, "LAYER": 1, "LR_BASE": 0.01}  # fast, not good


@pytest.fixture(scope="module")
def reproduced(clones, tmp_path_factory):
    pytest.importorskip("yaml")
    from deqfusion.cli import main

    out = tmp_path_factory.mktemp("mcan-reproduce")
    code = main(["reproduce", "mcan", "--generated", "--seed-list", "0", "--epochs", str(EPOCHS), "--batch-size", "16",
                 "--train-images", "32", "--val-images", "12", "--feat-dim", "24", "--upstream", str(clones["patched"]),
                 "--out", str(out), "--option", "f_max_iter=8", "--option", "b_max_iter=8", "--log-every", "4",
                 *[f"--model-option={k}={v}" for k, v in TEST_MODEL.items()],
                 "--device", "cpu", "--threads", "1", "--quiet"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    return out, res, {r["row"]: r for r in res["runs"]}


def test_reproduce_table_is_labelled_generated(reproduced):
    out, res, runs = reproduced
    table = (out / "table.md").read_text()
    assert res["generated"] and set(runs) == {"sum", "deq"}
    assert f"| MCAN ({GENERATED}) |" in table and f"| MCAN + DEQ fusion ({GENERATED}) |" in table
    assert "| MCAN — paper | 84.67 | 48.44 | 58.52 | 67.02 |" in table
    assert "| MCAN + DEQ fusion — paper | 85.17 | 49.07 | 58.69 | 67.38 |" in table
    assert "Yes/no | Number | Other | Overall" in table and "image-blind prior" in table
    assert (out / "data" / D.MARKER).is_file() and not (out / "work" / runs["deq"]["version"] / "ckpts").exists()


@pytest.mark.parametrize("row", ["sum", "deq"])
def test_upstream_loop_trains_and_evaluates(reproduced, row):
    out, _, runs = reproduced
    r = runs[row]
    assert r["settings"]["argv"][:3] == ["--RUN=train", "--MODEL=large", "--SPLIT=train"]
    assert [e["epoch"] for e in r["epochs"]] == list(range(1, EPOCHS + 1))
    steps = len(r["step_losses"])
    assert steps == EPOCHS * (96 // 16) * 2 and R.finite(r["step_losses"])   # printed per sub-batch (--ACCU 2)
    losses = [e["loss"] for e in r["epochs"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    stdout = (out / "logs" / f"{r['version']}.stdout").read_text()
    assert stdout.count("Overall Accuracy is:") == EPOCHS and "Per Answer Type Accuracy is the following:" in stdout
    for e in r["epochs"]:
        assert set(e["accuracy"]) == {"overall", "yes/no", "number", "other"}
        assert all(0.0 <= v <= 100.0 for v in e["accuracy"].values())
    assert r["vectors"] in ("standin", "real")


def test_deq_fusion_statistics_gradients_and_jacobian_term(reproduced):
    out, _, runs = reproduced
    deq, base = runs["deq"], runs["sum"]
    assert base["deq_log_lines"] == [] and base["fusion_grad_norms"] == {} and base["train_forwards"] == 0
    assert deq["deq_log_lines"] and all(ln.startswith("[deqfusion] ") for ln in deq["deq_log_lines"])
    assert any("train forwards" in ln for ln in deq["deq_log_lines"]) and any("eval forwards" in ln for ln in deq["deq_log_lines"])
    log = (out / "logs" / f"{deq['version']}.log").read_text()
    assert "Overall Accuracy is:" in log and deq["deq_log_lines"][0] in log     # MCAN's own log file
    grads = deq["fusion_grad_norms"]
    assert grads and all(math.isfinite(g) and g > 0 for g in grads.values()), grads
    # every training forward (6 steps x --ACCU 2 per epoch) put its Jacobian term into MCAN's loss
    assert deq["train_forwards"] == EPOCHS * 6 * 2 == deq["jac_terms_taken"]
    for e in deq["epochs"]:
        tr, ev = e["fusion_train"], e["fusion_eval"]
        assert tr["samples"] == 96 and 1 <= tr["nstep_max"] <= 8 and tr["jac_loss_mean"] > 0
        assert tr["backward_nstep_mean"] >= 1
        assert ev["samples"] == 36 and "jac_loss_mean" not in ev    # no Jacobian work in MCAN's evaluation
    assert deq["settings"]["jac_weight"] == A.DEFAULT_JAC_WEIGHT


def test_incomplete_data_is_named_before_mcan_exits(clones, tmp_path):
    D.write_generated(tmp_path, D.GeneratedSpec(train_images=2, val_images=2, test_images=1, vg_images=1, feat_dim=24))
    (tmp_path / "coco_extract" / "test2015").rename(tmp_path / "coco_extract" / "elsewhere")
    with pytest.raises(D.DataError, match="test2015"):
        R.run(R.RunSpec(tmp_path, A.Settings(fusion="sum"), model_overrides=R.tiny_overrides(24)), clones["patched"])
    (tmp_path / "coco_extract" / "elsewhere").rename(tmp_path / "coco_extract" / "test2015")
    with pytest.raises(D.DataError, match="IMG_FEAT_SIZE=2048"):
        R.run(R.RunSpec(tmp_path, A.Settings(fusion="sum")), clones["patched"])
    with pytest.raises(R.UpstreamError, match="not patched"):
        R.check_upstream(clones["pristine"])


def test_reproduce_without_data_says_how_to_get_it(clones, tmp_path, monkeypatch, capsys):
    from deqfusion.cli import main

    monkeypatch.delenv(D.ENV_DATA, raising=False)
    code = main(["reproduce", "mcan", "--upstream", str(clones["patched"]), "--out", str(tmp_path)])
    assert code == 2 and "--generated" in capsys.readouterr().err
