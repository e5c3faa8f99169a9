"""input_scale (an option beside the paper): f_theta's output carries the per-sample RMS of x_i."""
from __future__ import annotations

import torch

from helpers_core import contractive_fusion, inputs, rel_err


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).pow(2).mean(1).sqrt()


def test_each_modality_state_is_the_paper_state_times_the_input_rms():
    plain = contractive_fusion(scale=0.4, in_dims=[12, 16]).eval()
    scaled = contractive_fusion(scale=0.4, in_dims=[12, 16], input_scale=True).eval()
    scaled.load_state_dict(plain.state_dict())
    xs = inputs(5, (12, 16), spatial=(3,))
    xs = [x * torch.linspace(0.2, 3.0, 5, dtype=x.dtype).view(-1, 1, 1) for x in xs]   # per-sample scales
    f_plain, _ = plain.fixed_point_map(xs)
    f_scaled, _ = scaled.fixed_point_map(xs)
    z = torch.randn(5, 3 * 16 * 3, dtype=torch.float64)
    a = f_plain(z).view(5, 3, 16, 3)
    b = f_scaled(z).view(5, 3, 16, 3)
    projected = [plain.projections[0](xs[0]), xs[1]]                      # x_i after the in_dims projection
    for i in range(2):
        expect = a[:, i] * _rms(projected[i]).view(-1, 1, 1)
        assert rel_err(b[:, i], expect) < 1e-12
    assert not torch.allclose(a[:, 2], b[:, 2])                             # the fused branch sees the scaled z_i


def test_the_relative_size_of_the_inputs_survives_the_solve():
    xs = inputs(32, (16, 16))
    scale = torch.logspace(-0.5, 0.5, 32, dtype=torch.float64).view(-1, 1)
    xs = [xs[0] * scale, xs[1]]
    for on in (False, True):
        fusion = contractive_fusion(scale=0.4, input_scale=on, f_tol=1e-10, f_max_iter=200).eval()
        with torch.no_grad():
            out = fusion(xs)
        assert out.stats.converged.all()
        z1 = out.stats.state.view(32, 3, 16)[:, 0]
        ratio = _rms(z1) / _rms(xs[0])
        if on:   # ||z_1*|| follows ||x_1||: their ratio is the same for every sample
            assert float(ratio.std() / ratio.mean()) < 5e-2   # the affine GroupNorm output varies by ~2%
        else:    # GroupNorm gives every sample the same size: the ratio follows 1 / ||x_1||
            assert float(_rms(z1).std() / _rms(z1).mean()) < 5e-2
            assert float(ratio.std() / ratio.mean()) > 0.3
