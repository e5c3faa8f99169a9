"""The MultiBench adapter without the upstream: settings, the fusion / objective / optimiser MultiBench's
train() takes, the import stand-ins, and the reproduce command's rows and tables."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from torch import nn

from deqfusion.adapters import multibench as A
from deqfusion.adapters.common import import_standins as S
from deqfusion.adapters.common import reproduce as reproduce_command
from deqfusion.adapters.common.report import GENERATED
from deqfusion.adapters.common.settings import ABLATION_ROWS, SettingsError
from deqfusion.adapters.multibench import reproduce


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in A.Settings.env_names():
        monkeypatch.delenv(name, raising=False)


# -- settings -----------------------------------------------------------------------------------


def test_settings_defaults_are_the_papers_and_come_from_the_environment(monkeypatch):
    s = A.current_settings()
    assert (s.fusion, s.ablation, s.jac_weight, s.lr, s.fusion_lr, s.data) == ("deq", "full", 0.1, None, 1e-4, None)
    assert s.fusion_kwargs() == {"f_max_iter": 105, "b_max_iter": 106, "ablation": "full"}
    assert A.lr(8e-3, s) == 1e-3 and A.lr(8e-3, A.Settings(fusion="concat")) == 8e-3
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_FUSION", "concat")
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_LR", "2e-3")
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_FUSION_LR", "3e-5")
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_OPTIONS", "f_max_iter=7")
    s = A.current_settings()
    assert (s.fusion, s.lr, s.fusion_lr, s.options) == ("concat", 2e-3, 3e-5, {"f_max_iter": 7})
    assert A.lr(8e-3, s) == 2e-3
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_FUSION_LR", "-1")
    with pytest.raises(SettingsError, match="fusion_lr must be a number > 0"):
        A.current_settings()
    monkeypatch.delenv("DEQFUSION_MULTIBENCH_FUSION_LR")
    monkeypatch.setenv("DEQFUSION_MULTIBENCH_FUSON", "deq")
    with pytest.raises(SettingsError, match="unknown setting DEQFUSION_MULTIBENCH_FUSON"):
        A.current_settings()
    with pytest.raises(SettingsError, match="f_max_iter"):
        A.Settings(options={"f_thres": 3})
    with A.configure(fusion="concat", data="/x.hdf5"):
        assert A.current_settings().data == "/x.hdf5"


def test_concat_setting_hands_train_the_upstreams_own_objects():
    s = A.Settings(fusion="concat")
    concat, bce = object(), nn.BCEWithLogitsLoss()
    fusion = A.build_fusion(concat, [512, 512], settings=s)
    assert fusion is concat
    assert A.fused_width(fusion, 1024) == 1024
    assert A.objective(bce, s) is bce
    assert A.optimizer(fusion, torch.optim.AdamW, s) is torch.optim.AdamW


def _deq(**options):
    opts = {"f_max_iter": 8, "b_max_iter": 8}
    opts.update(options)
    return A.Settings(options=opts, log_stats=False)


def test_deq_fusion_returns_a_plain_tuple_that_mmdl_unpacks():
    torch.manual_seed(0)
    s = _deq()
    fusion = A.build_fusion(object(), [512, 512], settings=s)
    assert isinstance(fusion, A.MultiBenchFusion) and A.fused_width(fusion, 1024) == 512
    out = fusion([torch.randn(6, 512), torch.randn(6, 512)])
    # Supervised_Learning.MMDL.forward: `if type(out) is tuple: out = out[0]` -- a NamedTuple would fail it
    assert type(out) is tuple and len(out) == 3
    fused, jac, stats = out
    assert fused.shape == (6, 512) and jac.dim() == 0 and float(jac.detach()) >= 0 and stats.nstep.shape == (6,)
    other = A.build_fusion(object(), [300, 512], dim=256, settings=s)
    assert other([torch.randn(3, 300), torch.randn(3, 512)])[0].shape == (3, 256)


def test_phase_statistics_are_logged_when_the_mode_changes(capsys, tmp_path):
    torch.manual_seed(0)
    fusion = A.build_fusion(object(), [16, 16], settings=A.Settings(options={"f_max_iter": 5, "b_max_iter": 5}))
    fusion.train()
    for _ in range(2):
        fused, jac, _ = fusion([torch.randn(4, 16), torch.randn(4, 16)])
        (fused.sum() + jac).backward()
    fusion.eval()  # closes the training phase
    with torch.no_grad():
        fusion([torch.randn(3, 16), torch.randn(3, 16)])
    assert len(fusion.phase_log) == 1
    train = fusion.phase_log[0]
    assert (train["phase"], train["batches"], train["samples"]) == ("train", 2, 8)
    assert 1 <= train["nstep_max"] <= 5 and sum(train["status"].values()) == 8 and train["jac_loss_mean"] >= 0
    assert train["backward"]["batches"] == 2 and 1 <= train["backward"]["nstep_max"] <= 5
    line = capsys.readouterr().out
    assert "[deqfusion] DEQ fusion, train phase 1 (2 batches, 8 samples): forward steps" in line and "backward" in line
    # torch.save(model) while a phase is open: the loaded copy starts its own phase (the test pass)
    torch.save(fusion, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        loaded([torch.randn(5, 16), torch.randn(5, 16)])
    assert loaded.flush_stats()["samples"] == 5
    assert fusion.flush_stats()["samples"] == 3


def test_objective_adds_the_weighted_jacobian_term_from_multibench_args():
    base = nn.BCEWithLogitsLoss()
    obj = A.objective(base, A.Settings(jac_weight=0.1))
    pred, truth = torch.randn(4, 23), torch.randint(0, 2, (4, 23), dtype=torch.int32)
    jac = torch.tensor(2.5)
    args = {"fused": (torch.zeros(4, 8), jac, None)}
    want = base(pred, truth.float()) + 0.25
    assert torch.allclose(obj(pred, truth, args), want)
    with pytest.raises(TypeError, match="objective_args_dict=\\{\\}"):
        obj(pred, truth, None)
    with pytest.raises(ValueError, match="not the \\(fused, jac_loss, stats\\) tuple"):
        obj(pred, truth, {"fused": torch.zeros(4, 8)})


def test_optimizer_gives_the_fusion_its_own_learning_rate():
    torch.manual_seed(0)
    s = _deq()
    fusion = A.build_fusion(object(), [8, 8], settings=s)
    head = nn.Linear(8, 3)
    model = nn.ModuleDict({"fuse": fusion, "head": head})
    factory = A.optimizer(fusion, torch.optim.AdamW, s)
    # how Supervised_Learning.train calls it: one flat list, one lr
    opt = factory([p for p in model.parameters() if p.requires_grad], lr=A.lr(8e-3, s), weight_decay=0.01)
    assert factory.last is opt
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoders+head"]["lr"] == 1e-3 and groups["fusion"]["lr"] == 1e-4
    assert {id(p) for p in groups["fusion"]["params"]} == {id(p) for p in fusion.parameters()}
    assert {id(p) for p in groups["encoders+head"]["params"]} == {id(p) for p in head.parameters()}
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    with pytest.raises(ValueError, match="none of the parameters"):
        factory(list(head.parameters()), lr=1e-3)


# -- import stand-ins ---------------------------------------------------------------------------


REASONS = {"deqfusion_fake_dead_pkg": "a test stands it in", "json": "json is really installed"}


@pytest.fixture
def standins():
    with S.stand_ins(REASONS) as stood:
        yield stood
    assert not S.installed() or "deqfusion_fake_dead_pkg" not in S.installed()


def test_stand_ins_import_and_raise_a_clear_error_when_called(standins):
    import json as real_json

    assert standins == {"deqfusion_fake_dead_pkg": "a test stands it in"}  # json is real: never shadowed
    assert not S.is_stand_in(real_json) and real_json.dumps([1]) == "[1]"
    from deqfusion_fake_dead_pkg.bricks.conv import Convolutional  # noqa: F401 - submodules of a stand-in import
    from deqfusion_fake_dead_pkg.bricks import FeedforwardSequence

    assert S.is_stand_in(sys.modules["deqfusion_fake_dead_pkg.bricks"]) and S.is_stand_in(FeedforwardSequence)

    class VGGNet(FeedforwardSequence):  # module-level code of vgg.py does this
        pass

    with pytest.raises(S.StandInError, match=r"VGGNet \(a subclass of the stand-in deqfusion_fake_dead_pkg.bricks."
                                             r"FeedforwardSequence\) was called, but 'deqfusion_fake_dead_pkg' is not "
                                             r"installed here.*because a test stands it in"):
        VGGNet()
    import deqfusion_fake_dead_pkg as fake

    with pytest.raises(S.StandInError, match=r"deqfusion_fake_dead_pkg.tensor.tensor4 was called"):
        fake.tensor.tensor4("x")
    with pytest.raises(AttributeError):
        fake.__wrapped__  # noqa: B018 - dunder probes (inspect, pickle) must not get stand-ins


def test_an_installed_package_is_never_shadowed(tmp_path, monkeypatch):
    """The finder sits last on sys.meta_path: a real package that was not imported yet still wins."""
    (tmp_path / "deqfusion_real_pkg").mkdir()
    (tmp_path / "deqfusion_real_pkg" / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with S.stand_ins({"deqfusion_real_pkg": "must not be used"}) as stood:
            assert stood == {}
            import deqfusion_real_pkg

            assert deqfusion_real_pkg.VALUE == 42 and not S.is_stand_in(deqfusion_real_pkg)
    finally:
        sys.modules.pop("deqfusion_real_pkg", None)


def test_stand_ins_never_invent_submodules_of_real_packages(standins):
    with pytest.raises(ModuleNotFoundError):
        import json.deqfusion_no_such_module  # noqa: F401


def test_stand_ins_are_removed_on_exit():
    with S.stand_ins({"deqfusion_fake_dead_pkg": "x"}):
        import deqfusion_fake_dead_pkg  # noqa: F401
    assert "deqfusion_fake_dead_pkg" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        import deqfusion_fake_dead_pkg  # noqa: F401,F811
    assert not any(isinstance(f, S.StandInFinder) for f in sys.meta_path)


def test_the_adapters_stand_ins_name_what_and_why():
    assert set(A.STANDINS) == {"gensim", "theano", "blocks", "torchvision"}
    for name, reason in A.STANDINS.items():
        assert "never calls" in reason or "no_robust=False" in reason, name
    assert "get_data.py" in A.STANDINS["gensim"] and "vgg.py" in A.STANDINS["theano"] and \
        "vgg.py" in A.STANDINS["blocks"] and "common_models.py" in A.STANDINS["torchvision"]


# -- the reproduce command ----------------------------------------------------------------------


def test_reproduce_multibench_is_registered_and_imports_neither_torch_nor_h5py():
    assert "multibench" in reproduce_command.upstreams_with_reproduce()
    code = ("import sys; import deqfusion.adapters.multibench.reproduce, deqfusion.adapters.multibench.data, "
            "deqfusion.adapters.multibench.runner; print(sorted(m for m in ('torch', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _args(*argv):
    parser = argparse.ArgumentParser()
    reproduce.add_parser(parser.add_subparsers())
    return parser.parse_args(["multibench", *argv])


def test_rows_map_table_8_to_the_cores_ablation_names():
    from deqfusion.config import ABLATIONS

    rows = reproduce.build_rows(_args())
    assert [r.key for r in rows] == ["concat", "deq:full"]
    assert rows[0].settings.fusion == "concat" and rows[1].settings.fusion_kwargs()["f_max_iter"] == 105
    rows = reproduce.build_rows(_args("--ablation", "--jac-weight", "0.5", "--option", "f_tol=1e-4"))
    assert [r.key for r in rows] == ["concat"] + [f"deq:{a}" for a in ABLATION_ROWS]
    assert all(r.settings.ablation in ABLATIONS for r in rows[1:])
    assert all(r.settings.jac_weight == 0.5 and r.settings.options["f_tol"] == 1e-4 for r in rows[1:])
    rows = reproduce.build_rows(_args("--generated", "--ablation", "no_gate", "--no-baseline"))
    assert [r.key for r in rows] == ["deq:no_gate"] and rows[0].settings.options["f_max_iter"] == 20


def _run(row, seed, micro, macro):
    return {"row": row, "seed": seed, "metrics": {"micro": micro, "macro": macro}, "epochs_trained": 3,
            "best_epoch": 2, "fusion_test": {"nstep_mean": 4.0, "rel_residual_max": 1e-3, "samples": 10,
                                             "status": {"converged": 9, "max_iter": 1}} if row != "concat" else {}}


@pytest.mark.parametrize("generated", [True, False])
def test_table_2_format_with_the_papers_numbers_and_generated_labels(generated):
    rows = reproduce.build_rows(_args())
    runs = [_run("concat", 0, 50.0, 40.0), _run("concat", 1, 52.0, 42.0), _run("deq:full", 0, 55.5, 44.25)]
    text = reproduce.render_tables(reproduce.summarize(runs, rows), rows, generated)
    lines = text.splitlines()
    ours = [ln for ln in lines if ln.startswith("| ") and "— paper" not in ln and "method" not in ln]
    assert len(ours) == 2
    assert "| Late fusion (MultiBench: concatenation) |" in ours[0] and "51.00 ± 1.41 | 41.00 ± 1.41 |" in ours[0]
    assert "| 55.50 | 44.25 |" in ours[1] and "90% converged" in ours[1]
    assert all((GENERATED in ln) == generated for ln in ours)
    assert "| Late fusion (MultiBench: concatenation) — paper | paper, MM-IMDB | 59.02 | 50.27 |" in text
    assert "| DEQ fusion — paper | paper, MM-IMDB | 61.52 | 53.38 |" in text
    assert ("Generated data, not a result" in text) == generated


def test_ablation_table_says_the_paper_numbers_are_missing():
    rows = reproduce.build_rows(_args("--ablation", "weighted_sum", "full"))
    runs = [_run("concat", 0, 50.0, 40.0), _run("deq:weighted_sum", 0, 51.0, 41.0), _run("deq:full", 0, 52.0, 43.0)]
    text = reproduce.render_tables(reproduce.summarize(runs, rows), rows, True)
    assert "paper Table 8 rows" in text and "weighted sum (no f_θ, no f_fuse, no DEQ)" in text
    assert "| DEQ fusion (full) — paper | paper, MM-IMDB | 61.52 | 53.38 |" in text and "could not be read" in text


def test_reproduce_without_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from deqfusion.cli import main

    monkeypatch.delenv("DEQFUSION_DATA", raising=False)
    clone = tmp_path / "mb"
    (clone / "examples" / "multimedia").mkdir(parents=True)
    (clone / "training_structures").mkdir()
    (clone / "training_structures" / "Supervised_Learning.py").write_text("")
    (clone / "examples" / "multimedia" / "mmimdb_simple_late_fusion.py").write_text("deq_adapter\n")
    code = main(["reproduce", "multibench", "--upstream", str(clone), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no MM-IMDB file given" in err and "archive.org/download/mmimdb" in err
    (clone / "examples" / "multimedia" / "mmimdb_simple_late_fusion.py").write_text("import torch\n")
    code = main(["reproduce", "multibench", "--upstream", str(clone), "--generated", "--out", str(tmp_path / "o")])
    assert code == 2 and "is not patched for DEQ fusion" in capsys.readouterr().err



def test_dockerfile_runs_the_training_command_in_multibenchs_era():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docker" / "multibench" / "Dockerfile").read_text()
    assert "FROM python:3.8." in text  # MultiBench's environment.yml: Python 3.8.5
    assert 'ARG TORCH_VERSION=2.1.2' in text and 'ARG TORCHVISION_VERSION=0.16.2' in text  # core: torch >= 2.1
    assert "WORKDIR /opt/deqfusion/third_party/multibench" in text
    assert text.rstrip().endswith('CMD ["python", "examples/multimedia/mmimdb_simple_late_fusion.py"]')
    assert "DEQFUSION_MULTIBENCH_DATA=/data/multimodal_imdb.hdf5" in text


def test_dataloader_workers_fork_inside_spawned_pool_workers():
    """run_pool workers are spawned; MultiBench's DataLoaders must still fork (stand-ins, the split-mapping class)."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from deqfusion.adapters.multibench import runner

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method on this platform")
    with_workers, without = DataLoader(list(range(4)), num_workers=2), DataLoader(list(range(4)))
    runner._fork_workers((with_workers, without, {"image": []}))
    assert with_workers.multiprocessing_context.get_start_method() == "fork"
    assert without.multiprocessing_context is None


@pytest.mark.parametrize("line, want", [
    ("Epoch 3 train loss: tensor(0.6931, grad_fn=<DivBackward0>)", ("train", 3, 0.6931)),
    ("Epoch 3 train loss: tensor(0.6931, device='cuda:0', grad_fn=<DivBackward0>)", ("train", 3, 0.6931)),
    ("Epoch 0 valid loss: tensor(2.6616) f1_micro: 0.187 f1_macro: 0.156", ("valid", 0, 2.6616, 0.187, 0.156)),
    ("Epoch 0 valid loss: tensor(2.6616, device='cuda:0') f1_micro: 0.5 f1_macro: 0.25", ("valid", 0, 2.6616, 0.5, 0.25)),
    ("Saving Best", ("saved",)),
    ("Training Peak Mem: 669.0", ("info", "Training Peak Mem", "669.0")),
    (" f1_micro: 0.25 f1_macro: 0.18", None),
])
def test_multibench_output_is_parsed_on_cpu_and_gpu(line, want):
    from deqfusion.adapters.multibench import runner

    assert runner.parse_line(line) == want
