"""The one settings mechanism every adapter shares (adapters/common/settings.py) and the one answer to
where a clone lives (deqfusion.upstream.paths.clone_dir)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import pytest

from deqfusion.adapters.common.settings import FusionSettings, SettingsError, parse_options
from deqfusion.upstream import paths


@dataclass(frozen=True)
class Toy(FusionSettings):
    upstream: ClassVar[str] = "toyup"
    baseline: ClassVar[str] = "sum"
    default_options: ClassVar[Mapping[str, Any]] = {"f_max_iter": 9}

    jac_weight: float = 0.5
    fusion_lr: Optional[float] = None
    warm: bool = False


@dataclass(frozen=True)
class Other(FusionSettings):
    upstream: ClassVar[str] = "otherup"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in Toy.env_names() + Other.env_names():
        monkeypatch.delenv(name, raising=False)


def test_environment_names_types_and_defaults(monkeypatch):
    assert Toy.env_names() == ("DEQFUSION_TOYUP_FUSION", "DEQFUSION_TOYUP_ABLATION", "DEQFUSION_TOYUP_JAC_WEIGHT",
                               "DEQFUSION_TOYUP_OPTIONS", "DEQFUSION_TOYUP_FUSION_LR", "DEQFUSION_TOYUP_WARM")
    assert Toy.current() == Toy()
    monkeypatch.setenv("DEQFUSION_TOYUP_FUSION", "sum")
    monkeypatch.setenv("DEQFUSION_TOYUP_JAC_WEIGHT", "0.01")
    monkeypatch.setenv("DEQFUSION_TOYUP_FUSION_LR", "1e-4")
    monkeypatch.setenv("DEQFUSION_TOYUP_WARM", "yes")
    monkeypatch.setenv("DEQFUSION_TOYUP_OPTIONS", "f_solver=broyden, f_tol=1e-6")
    s = Toy.current()
    assert (s.fusion, s.jac_weight, s.fusion_lr, s.warm) == ("sum", 0.01, 1e-4, True)
    assert not s.is_deq
    assert s.fusion_kwargs() == {"f_max_iter": 9, "f_solver": "broyden", "f_tol": 1e-6, "ablation": "full"}
    monkeypatch.setenv("DEQFUSION_TOYUP_FUSION_LR", "none")
    assert Toy.current().fusion_lr is None


def test_unknown_or_bad_settings_name_the_fix(monkeypatch):
    monkeypatch.setenv("DEQFUSION_TOYUP_JAC_WIEGHT", "1")
    with pytest.raises(SettingsError, match="unknown setting DEQFUSION_TOYUP_JAC_WIEGHT; toyup reads .*JAC_WEIGHT"):
        Toy.current()
    monkeypatch.delenv("DEQFUSION_TOYUP_JAC_WIEGHT")
    monkeypatch.setenv("DEQFUSION_TOYUP_WARM", "maybe")
    with pytest.raises(SettingsError, match="DEQFUSION_TOYUP_WARM='maybe': expected a boolean"):
        Toy.current()
    monkeypatch.delenv("DEQFUSION_TOYUP_WARM")
    monkeypatch.setenv("DEQFUSION_TOYUP_OPTIONS", "f_thres=30")
    with pytest.raises(SettingsError, match="Did you mean 'f_max_iter'"):
        Toy.current()
    with pytest.raises(SettingsError, match="fusion must be one of \\('deq', 'sum'\\)"):
        Toy(fusion="concat")
    with pytest.raises(SettingsError, match="unknown ablation"):
        Toy(ablation="fulll")
    with pytest.raises(SettingsError, match="'dim' cannot be set here"):
        Toy(options={"dim": 8})
    with pytest.raises(SettingsError, match="jac_weight must be a number >= 0"):
        Toy(jac_weight=-1)
    with pytest.raises(TypeError):
        Toy(jac_wieght=1)  # a misspelled field is Python's own error
    with pytest.raises(SettingsError, match="expected key=value"):
        parse_options("f_max_iter")


def test_configure_wins_nests_restores_and_is_per_upstream(monkeypatch):
    monkeypatch.setenv("DEQFUSION_TOYUP_JAC_WEIGHT", "2")
    with Toy.configure(jac_weight=3.0) as outer:
        assert Toy.current() is outer and outer.jac_weight == 3.0
        assert Other.current() == Other()          # another upstream's settings are not touched
        with Toy.configure(Toy(fusion="sum")) as inner:
            assert Toy.current() is inner
        assert Toy.current() is outer
    assert Toy.current().jac_weight == 2.0         # back to the environment
    with pytest.raises(SettingsError, match="configure\\(\\) of Toy got Other"):
        with Toy.configure(Other()):
            pass
    with pytest.raises(RuntimeError):
        with Toy.configure(jac_weight=4.0):
            raise RuntimeError("boom")
    assert Toy.current().jac_weight == 2.0         # restored after an error too


def test_clone_dir_is_the_patch_tools_answer(monkeypatch, tmp_path):
    from deqfusion.upstream.manifest import load_manifest
    from deqfusion.upstream.operations import resolve

    monkeypatch.delenv(paths.CLONES_ENV, raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert paths.clone_dir("mmdynamics") == resolve(load_manifest(), "mmdynamics").dest
    assert paths.clone_dir("mmdynamics") == (repo / "third_party" / "mmdynamics").resolve()
    monkeypatch.setenv(paths.CLONES_ENV, str(tmp_path))
    assert paths.clone_dir("mmdynamics") == tmp_path.resolve() / "mmdynamics"
    assert resolve(load_manifest(), "mmdynamics").dest == tmp_path.resolve() / "mmdynamics"
    assert paths.clone_dir("mmdynamics", tmp_path / "x") == (tmp_path / "x").resolve()
