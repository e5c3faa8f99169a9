"""Every bad option and bad input is a clear error that names the fix."""
from __future__ import annotations

import pytest
import torch

from deqfusion import DEQFusion
from deqfusion.config import ConfigError


@pytest.mark.parametrize("option, hint", [
    ("f_thres", "f_max_iter"),          # the official release's name
    ("stop_mode", "f_stop_mode"),       # torchdeq issue #12
    ("f_anderson_m", "anderson_m"),
    ("f_tool", "f_tol"),                # a typo
    ("jacobian_weight", "weight jac_loss yourself"),
])
def test_unknown_option_suggests_the_right_one(option, hint):
    with pytest.raises(TypeError, match=rf"unknown option '{option}'.*{hint}"):
        DEQFusion(16, 2, **{option: 1})


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(dim=30, num_modalities=2), r"dim=30 is not divisible by num_groups=4"),
    (dict(dim=16, num_modalities=0), r"num_modalities must be an int >= 1"),
    (dict(dim=16, num_modalities=2, in_dims=[8]), r"in_dims has 1 entries but num_modalities=2"),
    (dict(dim=16, num_modalities=2, ablation="fulll"), r"unknown ablation 'fulll'"),
    (dict(dim=16, num_modalities=2, f_solver="newton"), r"f_solver='newton' is unknown"),
    (dict(dim=16, num_modalities=2, f_stop_mode="relative"), r"f_stop_mode='relative' is unknown"),
    (dict(dim=16, num_modalities=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dim=16, num_modalities=2, jac_freq=2.0), r"jac_freq is a probability"),
])
def test_bad_option_values(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DEQFusion(**kwargs)


def test_dim_is_positional_but_options_are_keyword_only():
    with pytest.raises(TypeError):
        DEQFusion(16, 2, None)  # type: ignore[misc]


@pytest.fixture
def fusion():
    return DEQFusion(16, 2, in_dims=[16, 8])


def ok(b=3):
    return [torch.randn(b, 16), torch.randn(b, 8)]


def test_wrong_number_of_modalities(fusion):
    with pytest.raises(ValueError, match=r"built for num_modalities=2 but got 3 tensors"):
        fusion(ok() + [torch.randn(3, 16)])


def test_not_a_list(fusion):
    with pytest.raises(TypeError, match=r"expects a list of 2 tensors"):
        fusion(torch.randn(3, 16))


def test_mismatched_batch_sizes(fusion):
    with pytest.raises(ValueError, match=r"batch sizes differ: modality 0 has 3 samples, modality 1 has 4"):
        fusion([torch.randn(3, 16), torch.randn(4, 8)])


def test_wrong_channel_width(fusion):
    with pytest.raises(ValueError, match=r"modality 1 has 16 channels but DEQFusion expects 8.*in_dims"):
        fusion([torch.randn(3, 16), torch.randn(3, 16)])


def test_empty_batch(fusion):
    with pytest.raises(ValueError, match=r"empty batch"):
        fusion([torch.randn(0, 16), torch.randn(0, 8)])


def test_mixed_dtypes(fusion):
    with pytest.raises(TypeError, match=r"modality 1 is torch.float64 but modality 0 is torch.float32"):
        fusion([torch.randn(3, 16), torch.randn(3, 8, dtype=torch.float64)])


def test_inputs_and_parameters_dtype(fusion):
    with pytest.raises(TypeError, match=r"parameters are torch.float32.*fusion.to\(torch.float64\)"):
        fusion([torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)])


def test_mixed_devices(fusion):
    meta = torch.empty(3, 8, device="meta")
    with pytest.raises(ValueError, match=r"modality 1 is on meta but modality 0 is on cpu"):
        fusion([torch.randn(3, 16), meta])


def test_missing_batch_dimension(fusion):
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        fusion([torch.randn(16), torch.randn(8)])


def test_integer_input(fusion):
    with pytest.raises(TypeError, match=r"floating-point"):
        fusion([torch.ones(3, 16, dtype=torch.long), torch.ones(3, 8, dtype=torch.long)])


def test_spatial_mismatch():
    fusion = DEQFusion(16, 2)
    with pytest.raises(ValueError, match=r"spatial shapes differ"):
        fusion([torch.randn(2, 16, 5), torch.randn(2, 16, 6)])


def test_no_print_in_core():
    import pathlib
    import re

    core = pathlib.Path(__file__).resolve().parents[1] / "core"
    # core/upstream/ is the stand-alone patch tool (./apply_patches.sh), a command line without torch
    offenders = [str(p) for p in core.rglob("*.py") if p.parts[-2] != "upstream"
                 and re.search(r"^\s*print\(", p.read_text(), re.M)]
    assert not offenders
