"""The MM-Dynamics patch against the real upstream at its pinned commit, and its own training loop on CPU.

Needs a local mirror of TencentAILabHealthcare/mmdynamics: set DEQFUSION_MIRROR to a clone (or a bare
snapshot, or a folder holding one as `mmdynamics` / `TencentAILabHealthcare+mmdynamics`). The tests
skip with that reason when there is none. ROSMAP comes from ../shared/data (or DEQFUSION_SHARED_DATA).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqfusion.adapters import mmdynamics as A
from deqfusion.adapters.mmdynamics import runner as R
from deqfusion.adapters.mmdynamics import data as md
from helpers_upstream import mirror_clone, git

pytestmark = pytest.mark.mirror

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEQFUSION_SHARED_DATA", ROOT.parent / "shared" / "data"))
PATCHES = sorted((ROOT / "patches" / "mmdynamics").glob("*.patch"))
PIN = R.UPSTREAM_COMMIT


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """(pristine, patched) checkouts of the pinned commit. The .pt checkpoints are left out (sparse
    checkout): they are not needed, and snapshots of the repository may lack their large blobs."""
    mirror = mirror_clone("mmdynamics", PIN)
    out = {}
    for name in ("pristine", "patched"):
        dst = tmp_path_factory.mktemp("mmdynamics") / name
        git(dst.parent, "clone", "-q", "--no-checkout", str(mirror), str(dst))
        git(dst, "sparse-checkout", "set", "--no-cone", "/*", "!*.pt")
        subprocess.run(["git", "-C", str(dst), "checkout", "-q", "-b", "deqfusion", PIN], capture_output=True)
        assert (dst / "model.py").is_file() and (dst / "train_test.py").is_file()
        assert git(dst, "rev-parse", "HEAD").strip() == PIN
        out[name] = dst
    for patch in PATCHES:
        git(out["patched"], "apply", "--check", str(patch))
        git(out["patched"], "apply", str(patch))
    return out


def test_patch_applies_to_pinned_commit(clones):
    assert PATCHES, "no patches/mmdynamics/*.patch"
    changed = git(clones["patched"], "diff", "--name-only").split()
    assert changed == ["model.py"]
    text = (clones["patched"] / "model.py").read_text()
    assert "deq_adapter.build_fusion(self.views, hidden_dim[0])" in text
    assert "torch.cat([i for i in feature.values()], dim=1)" not in text
    # train_test.py is the upstream's, with the settings this project relies on
    tt = (clones["patched"] / "train_test.py").read_text()
    assert "hidden_dim = [300]" in tt and "hidden_dim = [500]" in tt and "num_epoch = 1000" in tt


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concat_setting_is_exactly_the_upstream_model(clones):
    pristine = _load(clones["pristine"] / "model.py", "mmd_model_pristine")
    patched = _load(clones["patched"] / "model.py", "mmd_model_patched")
    dims, hidden = [20, 30, 10], [12]
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(16, d, generator=g) for d in dims]
    label = torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(7)
    up = pristine.MMDynamic(dims, hidden, 3, dropout=0.5)
    with A.configure(fusion="concat"):
        torch.manual_seed(7)
        ours = patched.MMDynamic(dims, hidden, 3, dropout=0.5)
    assert ours.fusion is None
    sd_up, sd_ours = up.state_dict(), ours.state_dict()
    assert list(sd_up) == list(sd_ours) and all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_up)
    torch.manual_seed(3)
    loss_up, logit_up = up(data, label)
    loss_up.backward()
    torch.manual_seed(3)
    loss_ours, logit_ours = ours(data, label)
    loss_ours.backward()
    assert torch.equal(loss_up, loss_ours) and torch.equal(logit_up, logit_ours)
    for (k, p), q in zip(up.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), k


def test_deq_setting_builds_fusion_and_adds_jacobian_term(clones):
    pytest.importorskip("deqfusion.layer")
    patched = _load(clones["patched"] / "model.py", "mmd_model_patched2")
    with A.configure(fusion="deq", jac_weight=20.0, options={"f_max_iter": 15, "b_max_iter": 15}):
        model = patched.MMDynamic([20, 30, 10], [12], 3, dropout=0.5)
    assert isinstance(model.fusion, A.MMDynamicsFusion)
    assert model.MMClasifier[0].clf[0].in_features == 12  # hidden, not views * hidden
    data = [torch.rand(8, d) for d in (20, 30, 10)]
    label = torch.randint(0, 3, (8,))
    loss, logit = model(data, label)
    assert logit.shape == (8, 3) and model.fusion.last_jac_loss is not None
    loss.backward()
    assert all(p.grad is not None for p in model.fusion.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def rosmap():
    folder = SHARED / "ROSMAP"
    if not (folder / "1_tr.csv").is_file():
        pytest.skip(f"ROSMAP not found at {folder} (set DEQFUSION_SHARED_DATA)")
    return md.verify_folder(folder, "ROSMAP")


def test_upstream_loop_trains_deq_fusion_on_rosmap_cpu(clones, rosmap, tmp_path):
    pytest.importorskip("deqfusion.layer")
    spec = R.RunSpec("ROSMAP", rosmap, seed=0, epochs=2, device="cpu", threads=1,
                     settings=A.Settings(options={"f_max_iter": 20, "b_max_iter": 20}), keep_model=True)
    res = R.run(spec, clones["patched"], workdir=tmp_path)
    assert res.epochs_trained == 2
    assert "Training..." in res.upstream_log and "Test: Epoch 0" in res.upstream_log  # the upstream's own prints
    assert (tmp_path / "ROSMAP" / "1_tr.csv").is_symlink() or (tmp_path / "ROSMAP" / "1_tr.csv").is_file()
    assert [h["epoch"] for h in res.history] == [0, 1]  # the upstream's epoch-0 test, then the runner's final one
    train, ev = res.fusion_stats["train"], res.fusion_stats["eval"]
    assert 1 <= train["nstep_max"] <= 20 and sum(train["status"].values()) == 245 and train["jac_loss"] >= 0
    assert sum(ev["status"].values()) == 106
    assert set(res.metrics) == {"upstream", "test-best"} and 0 <= res.metrics["upstream"]["acc"] <= 100
    assert res.model.fusion is not None and len(res.test_inputs) == 3 and res.test_inputs[0].shape == (106, 200)
    # the sys.modules of this process are left as they were
    assert "train_test" not in sys.modules and "model" not in sys.modules


def test_runner_val_protocol_and_modalities(clones, rosmap):
    spec = R.RunSpec("ROSMAP", rosmap, seed=1, epochs=2, device="cpu", threads=1, protocol="val", modalities=(0, 2),
                     settings=A.Settings(fusion="concat"), keep_model=True)
    res = R.run(spec, clones["patched"])
    assert res.model.views == 2 and res.model.MMClasifier[0].clf[0].in_features == 600
    assert set(res.metrics) == {"val", "val-final"} and "val" in res.metrics["val"]
    assert res.test_inputs[0].shape == (106, 200)  # validation rows stripped off the evaluation batch


def test_reproduce_command_end_to_end(clones, rosmap, tmp_path):
    pytest.importorskip("deqfusion.layer")
    from deqfusion.cli import main

    out = tmp_path / "out"
    code = main(["reproduce", "mmdynamics", "--dataset", "rosmap", "--seed-list", "0", "--epochs", "2",
                 "--data-dir", str(SHARED), "--upstream", str(clones["patched"]), "--out", str(out),
                 "--option", "f_max_iter=20", "--option", "b_max_iter=20", "--unroll-steps", "2",
                 "--trace-steps", "12", "--device", "cpu", "--threads", "1", "--quiet"])
    assert code == 0
    table = (out / "table.md").read_text()
    assert "MM-Dynamics (concatenation)" in table and "DEQ fusion" in table and "protocol `upstream`" in table
    assert "protocol `test-best`" in table and "step 10" in table and "± " in table
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 3 and res["summary"]["upstream"]["deq:full"]["acc"][0] >= 0
    assert (out / "convergence.png").stat().st_size > 1000 and (out / "table.csv").is_file()
    assert len(list((out / "logs").glob("*.log"))) == 3


def test_reproduce_parallel_workers_give_the_serial_numbers(clones, rosmap, tmp_path):
    """--jobs 2 (spawned workers, traces computed there) reproduces --jobs 1 exactly: every run seeds itself."""
    pytest.importorskip("deqfusion.layer")
    from deqfusion.cli import main

    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        code = main(["reproduce", "mmdynamics", "--dataset", "rosmap", "--seed-list", "0,1", "--epochs", "2",
                     "--data-dir", str(SHARED), "--upstream", str(clones["patched"]), "--out", str(out),
                     "--option", "f_max_iter=6", "--option", "b_max_iter=6", "--unroll-steps", "2",
                     "--trace-steps", "8", "--device", "cpu", "--threads", "1", "--jobs", str(jobs), "--quiet"])
        assert code == 0
        res = json.loads((out / "results.json").read_text())
        assert res["jobs"] == jobs
        results[jobs] = (res, (out / "convergence.csv").read_text())
    (serial, serial_csv), (parallel, parallel_csv) = results[1], results[2]
    key = [(r["row"], r["seed"]) for r in serial["runs"]]
    assert key == [(r["row"], r["seed"]) for r in parallel["runs"]]  # same order, whatever finished first
    assert key == [("concat", 0), ("concat", 1), ("deq:full", 0), ("deq:full", 1), ("weight-tied:2", 0)]
    for a, b in zip(serial["runs"], parallel["runs"]):
        assert a["metrics"] == b["metrics"] and a["fusion_stats"] == b["fusion_stats"]
    assert serial_csv == parallel_csv and serial_csv.count("\n") == 9
