"""Does MM-Dynamics' per-sample confidence scaling survive the fusion? (issue 15's lead)

MM-Dynamics multiplies each view's features by that sample's TCP confidence before it fuses
them, so the relative size of the views carries information. f_θ normalises each modality
state per sample (GroupNorm), which may erase it. This trains one model per setting through
MM-Dynamics' own loop on ROSMAP, then measures on the test samples:

- cv(‖x_i‖), cv(‖z_i*‖): the spread over samples of each view's RMS before and after f_θ
  (coefficient of variation; 0 = every sample has the same size);
- corr(share): the correlation over samples between a view's share of the total size,
  ‖x_i‖ / Σ_j ‖x_j‖, and the same share of the states z_i*;
- corr(‖x_fuse‖, ‖fused‖): whether the size of the fused output follows its input.

    python -m bench.mmdynamics_scale --seed 0 --json docs/mmdynamics-scale.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROWS = {
    "full (f_θ + f_fuse + DEQ)": {"ablation": "full"},
    "fusion_deq (f_θ = identity)": {"ablation": "fusion_deq"},
}


def _corr(a, b) -> float:

    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def measure(model, test_inputs) -> Dict[str, Any]:
    """Scale statistics of a trained patched MMDynamic's fusion on its test inputs."""
    import torch

    from deqfusion.adapters.mmdynamics import runner

    xs = runner.fusion_inputs(model, test_inputs)
    deq = model.fusion.deq
    with torch.no_grad():
        out = deq(xs)
        xs_p = [proj(x) for proj, x in zip(deq.projections, xs)]
        k = deq._num_states()
        states = list(out.stats.state.view(xs[0].shape[0], k, *xs_p[0].shape[1:]).unbind(1))
        x_fuse = deq._weighted_sum(xs_p) if deq.modality_weights is not None else None

    def rms(t):
        return t.flatten(1).pow(2).mean(1).sqrt()

    n = len(xs)
    x_rms = torch.stack([rms(x) for x in xs_p], 1)            # (B, n)
    res: Dict[str, Any] = {"cv_x": [float(x_rms[:, i].std() / x_rms[:, i].mean()) for i in range(n)]}
    x_share = x_rms / x_rms.sum(1, keepdim=True)
    if deq.modality_blocks is not None:
        z_rms = torch.stack([rms(z) for z in states[:n]], 1)
        z_share = z_rms / z_rms.sum(1, keepdim=True)
        res["cv_z"] = [float(z_rms[:, i].std() / z_rms[:, i].mean()) for i in range(n)]
        res["corr_share"] = [_corr(x_share[:, i], z_share[:, i]) for i in range(n)]
    if x_fuse is not None:
        res["corr_fuse_out"] = _corr(rms(x_fuse), rms(out.fused))
        res["cv_fused"] = float(rms(out.fused).std() / rms(out.fused).mean())
    return res


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.mmdynamics_scale", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--jac-weight", type=float, default=0.1)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from deqfusion.adapters import mmdynamics as adapter
    from deqfusion.adapters.common.settings import parse_options
    from deqfusion.adapters.mmdynamics import data as mogonet_data
    from deqfusion.adapters.mmdynamics import runner

    extra = parse_options(",".join(args.option))
    data_dir = mogonet_data.locate("ROSMAP", None, download=False)
    upstream = runner.check_upstream(None)
    out: Dict[str, Any] = {}
    for name, opts in ROWS.items():
        settings = adapter.Settings(fusion="deq", ablation=opts["ablation"], jac_weight=args.jac_weight,
                                    options=dict({"f_max_iter": 12, "b_max_iter": 12}, **extra))
        spec = runner.RunSpec(dataset="ROSMAP", data_dir=data_dir, seed=args.seed, settings=settings,
                              epochs=args.epochs, device="cpu", threads=1, keep_model=True)
        r = runner.run(spec, upstream)
        out[name] = dict(measure(r.model, r.test_inputs), acc=r.metrics["upstream"]["acc"])
        print(name, json.dumps(out[name]), file=sys.stderr)
    lines = ["| row | cv ‖x_i‖ (views) | cv ‖z_i*‖ | corr(share x_i, share z_i*) | corr(‖x_fuse‖, ‖fused‖) | ACC |",
             "|---|---|---|---|---|---|"]
    for name, r in out.items():
        def fmt(v):
            return " / ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else ("–" if v is None else f"{v:.2f}")
        lines.append(f"| {name} | {fmt(r['cv_x'])} | {fmt(r.get('cv_z'))} | {fmt(r.get('corr_share'))} | "
                     f"{fmt(r.get('corr_fuse_out'))} | {r['acc']:.2f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    run()
