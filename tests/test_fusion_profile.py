"""bench.fusion_profile: its operator grouping and a run at tiny shapes (a cost profile, no timing asserted)."""
from __future__ import annotations

import pytest

from bench import fusion_profile as fp


@pytest.mark.parametrize("name, group", [
    ("aten::addmm", "matrix products"),
    ("aten::bmm", "matrix products"),
    ("aten::native_layer_norm_backward", "normalisation"),
    ("aten::native_group_norm", "normalisation"),
    ("aten::index_select", "copies and indexing"),
    ("aten::linalg_solve_ex", "small linear algebra"),
    ("aten::relu", fp.OTHER),
    ("aten::mul", fp.OTHER),
])
def test_operators_fall_in_their_group(name, group):
    assert fp.group_of(name) == group


def test_profile_runs_at_tiny_shapes_and_reports_shares(capsys):
    fusion, xs = fp.build(batch=6, dim=8, modalities=2, options={"f_max_iter": 3, "b_max_iter": 3, "f_tol": 0.0},
                          seed=0)
    result = fp.profile(fusion, xs, steps=1, jac_weight=0.1)
    for call in ("no-grad solve", "training step"):
        r = result[call]
        assert r["solver_steps"] == 3                     # f_tol=0: every step of the budget runs
        assert r["ms_per_call"] > 0
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert r["share"]["matrix products"] > 0
    assert fp.main(["--batch", "6", "--dim", "8", "--modalities", "2", "--steps", "1",
                    "--option", "f_max_iter=2"]) == 0
    out = capsys.readouterr().out
    assert "not a result" in out and "| no-grad solve |" in out


def test_compiled_map_comparison_reports_both_timings():
    pytest.importorskip("torch._inductor", reason="torch.compile's inductor backend is not available")
    fusion, xs = fp.build(batch=4, dim=8, modalities=2, options={"f_max_iter": 2}, seed=0)
    c = fp.compare_compiled(fusion, xs, calls=2)
    assert c["eager_ms"] > 0 and c["compiled_ms"] > 0 and c["compile_s"] > 0
    assert c["max_abs_diff"] < 1e-5                   # the compiled map is the same map
