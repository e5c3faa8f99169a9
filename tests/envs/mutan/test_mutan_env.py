"""Inside the Mutan venv (.ci/envs/mutan.sh: bootstrap.pytorch 0.0.13, skipthoughts, PyYAML 6, Python 3.11),
driven by tests/test_mutan_upstream.py: the run-time compatibility, our options against block's at the pin
(loaded by bootstrap's own loader), settings from bootstrap's Options, and DEQ fusion swapped into a network
that uses block's real Mutan and criterion.  DEQFUSION_TEST_MUTAN_CLONE names the block clone."""
from __future__ import annotations

import collections
import collections.abc
import os
import sys
from pathlib import Path

import pytest
import torch

from deqfusion.adapters.mutan import compat

CLONE = os.environ.get("DEQFUSION_TEST_MUTAN_CLONE")


@pytest.fixture(scope="module")
def clone():
    if not CLONE:
        pytest.skip("DEQFUSION_TEST_MUTAN_CLONE is not set (tests/test_mutan_upstream.py sets it to the block clone)")
    path = Path(CLONE)
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))


def test_compat_is_needed_here_and_installs_once():
    import yaml

    changed = compat.install()
    if sys.version_info >= (3, 10):
        assert "collections.Mapping" in changed
    assert collections.Mapping is collections.abc.Mapping
    assert yaml.load("a: [1, 2]") == {"a": [1, 2]}              # bootstrap's call, without a Loader
    assert any("accuracy" in c for c in changed) and any("log_value" in c for c in changed)
    assert compat.install() == [] and len(compat.installed()) == len(changed)


def test_topk_accuracy_is_bootstraps_metric_without_the_view():
    compat.install()
    from bootstrap.models.metrics import accuracy as module

    assert module.accuracy is compat.topk_accuracy
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(40, 9, generator=g), torch.randint(0, 9, (40, 1), generator=g)
    top1, top5 = module.accuracy(out, target, topk=[1, 5])
    ranks = (out > out.gather(1, target)).sum(1)                # how many outputs beat the target's
    assert float(top1) == pytest.approx(100.0 * float((ranks < 1).float().mean()))
    assert float(top5) == pytest.approx(100.0 * float((ranks < 5).float().mean()))
    keep = target.view(-1) != 3
    (t1,) = module.accuracy(out, target, topk=[1], ignore_index=3)
    assert float(t1) == pytest.approx(100.0 * float((ranks[keep] < 1).float().mean()))


def test_logger_stores_tensors_as_numbers(tmp_path):
    compat.install()
    from bootstrap.lib.logger import Logger

    Logger._instance = None
    try:
        Logger(str(tmp_path), name="logs").log_value("train_batch.norm", torch.tensor(0.5))
        Logger().flush()
        assert (tmp_path / "logs.json").read_text().count("0.5") == 1
    finally:
        Logger._instance = None


def _load(path):
    compat.install()
    from bootstrap.lib.options import Options

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    return flat(Options.load_yaml_opts(str(path)))


def test_our_baseline_options_are_blocks_with_the_fusion_type_fixed(clone):
    from deqfusion.adapters.mutan import options

    ours, theirs = _load(options.path("mutan")), _load(clone / "block" / "options" / "vqa2" / "mutan.yaml")
    assert theirs["model.network.classif.fusion.type"] == "block_tucker"      # the upstream's bug, still there
    diff = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert diff == {"model.network.attention.fusion.type", "model.network.classif.fusion.type", "exp.dir"}
    assert ours["model.network.classif.fusion.type"] == ours["model.network.attention.fusion.type"] == "mutan"
    assert ours["exp.dir"] == "logs/vqa2/mutan"


def test_the_deq_options_change_only_the_imports_and_add_the_deq_section():
    from deqfusion.adapters.mutan import options, reproduce

    base, deq = _load(options.path("mutan")), _load(options.path("mutan_deq"))
    diff = {k for k in set(base) | set(deq) if base.get(k) != deq.get(k)}
    assert {k for k in diff if not k.startswith("model.network.deq.")} == {
        "model.network.import", "model.criterion.import", "exp.dir"}
    assert deq["model.network.import"] == "deqfusion.adapters.mutan.network"
    assert deq["model.criterion.import"] == "deqfusion.adapters.mutan.criterion"
    listed = sorted(k.rsplit(".", 1)[1] for k in deq if k.startswith("model.network.deq.options."))
    assert listed == sorted(reproduce.YAML_OPTIONS)               # the flags `reproduce --option` may pass


def test_settings_from_bootstraps_options_and_flags(monkeypatch):
    compat.install()
    from bootstrap.lib.options import Options

    from deqfusion.adapters.mutan import SettingsError, options, settings_from_options

    monkeypatch.setattr(sys, "argv", ["bootstrap.run", "-o", str(options.path("mutan_deq")),
                                      "--model.network.deq.jac_weight", "0.5",
                                      "--model.network.deq.options.f_max_iter", "7",
                                      "--model.network.deq.options.jac_reg", "false"])
    Options._Options__instance = None
    try:
        Options()
        s = settings_from_options()
        assert (s.dim, s.jac_weight, s.options["f_max_iter"], s.options["jac_reg"], s.options["f_tol"]) == (
            700, 0.5, 7, False, 1e-05)
        monkeypatch.setenv("DEQFUSION_MUTAN_DIM", "64")
        with pytest.raises(SettingsError, match="--model.network.deq.dim"):
            settings_from_options()
    finally:
        Options._Options__instance = None


def test_deq_replaces_blocks_mutan_and_adds_the_term_to_blocks_criterion(clone):
    compat.install()
    from block.models.criterions.vqa_cross_entropy import VQACrossEntropyLoss
    from block.models.networks.fusions.fusions import Mutan
    from torch import nn

    from deqfusion.adapters.mutan import Settings
    from deqfusion.adapters.mutan.criterion import JacobianLoss
    from deqfusion.adapters.mutan.head import DEQClassifier
    from deqfusion.adapters.mutan.network import install_deq

    class Net(nn.Module):                                    # VQANet.forward's last two lines
        def __init__(self):
            super().__init__()
            self.fusion = Mutan([48, 40], 7, mm_dim=16, rank=3)

        def forward(self, batch):
            return {"logits": self.fusion([batch["q"], batch["v"]])}

    torch.manual_seed(0)
    net = Net()
    head = install_deq(net, Settings(dim=16, options={"f_max_iter": 8, "b_max_iter": 8}))
    assert isinstance(net.fusion, DEQClassifier) and head.input_dims == [48, 40] and head.output_dim == 7
    batch = {"q": torch.randn(5, 48), "v": torch.randn(5, 40), "class_id": torch.randint(0, 7, (5, 1))}
    crit = JacobianLoss(VQACrossEntropyLoss(), 0.1)
    net.train()
    out = net(batch)
    cri = crit(out, batch)
    assert torch.allclose(cri["loss"], VQACrossEntropyLoss()(out, batch)["loss"] + 0.1 * cri["jac_loss"])
    cri["loss"].backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.fusion.parameters())
