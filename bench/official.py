"""Run the authors' release (github.com/jinhong-ni/DEQFusion) from a local checkout.

Nothing of the release is copied or edited: its three files (DEQ_fusion.py, solver.py,
jacobian.py) are imported from the user's checkout, and what keeps them from running on a
current PyTorch without CUDA is patched around them at run time only, inside `shims()`:

- `torch.solve(B, A)` (removed in PyTorch 1.9+; the release's Anderson calls it) is mapped to
  `(torch.linalg.solve(A, B), None)`;
- `Tensor.cuda()` (the release builds its initial state with `.cuda()`) moves to the benchmark
  device instead, and `torch.cuda.synchronize()` (called in its backward hook) is a no-op
  without CUDA;
- `termcolor`/`scipy.optimize`, imported by its solver module but unused by Anderson, are
  stubbed if they are not installed;
- it prints the step count on every forward; that output is swallowed.

The release's module takes features of one width (B, D), so it has no counterpart for the
ImVoteNet-like (B, C, N) shape.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Iterator, Optional

import torch

from deqfusion import DEQFusion

FILES = ("DEQ_fusion.py", "solver.py", "jacobian.py")


class OfficialUnavailable(RuntimeError):
    pass


def find_checkout(path: str) -> Path:
    """The folder holding the release's DEQ_fusion.py, solver.py and jacobian.py."""
    root = Path(path).expanduser()
    for cand in (root, root / "DEQFusion"):
        if all((cand / f).is_file() for f in FILES):
            return cand
    raise OfficialUnavailable(
        f"--official {path}: expected a checkout of github.com/jinhong-ni/DEQFusion with "
        f"{', '.join(FILES)} at its top level; clone it with "
        f"`git clone https://github.com/jinhong-ni/DEQFusion` and pass that folder")


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def load(path: str) -> types.ModuleType:
    """Import the release's DEQ_fusion module (with its `solver`/`jacobian` siblings) from `path`."""
    root = find_checkout(path)
    # only what this function puts in sys.modules is put back afterwards: dropping a real
    # package imported meanwhile (scipy) would leave its submodules orphaned and break later imports
    replaced = ["solver", "jacobian"]
    saved: dict = {}
    try:
        try:
            import termcolor  # noqa: F401
        except ImportError:
            stub = types.ModuleType("termcolor")
            stub.colored = lambda text, *a, **k: text
            replaced.append("termcolor")
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            replaced += ["scipy", "scipy.optimize"]
        saved = {k: sys.modules.get(k) for k in replaced}
        if "termcolor" in replaced:
            sys.modules["termcolor"] = stub
        if "scipy" in replaced:
            scipy = types.ModuleType("scipy")
            opt = types.ModuleType("scipy.optimize")
            opt.root = None
            scipy.optimize = opt
            sys.modules["scipy"], sys.modules["scipy.optimize"] = scipy, opt
        # DEQ_fusion.py does `from solver import ...` / `from jacobian import ...`: serve its own
        # files under those names while it loads, then put back whatever was there
        sys.modules["solver"] = _load("_deqfusion_bench_official_solver", root / "solver.py")
        sys.modules["jacobian"] = _load("_deqfusion_bench_official_jacobian", root / "jacobian.py")
        module = _load("_deqfusion_bench_official_DEQ_fusion", root / "DEQ_fusion.py")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@contextlib.contextmanager
def shims(device: torch.device, quiet: bool = True) -> Iterator[None]:
    """The run-time patches listed in the module docstring, undone on exit."""
    saved_solve = getattr(torch, "solve", None)
    saved_cuda = torch.Tensor.cuda
    saved_sync = torch.cuda.synchronize

    def solve(B, A, *args, **kwargs):
        return torch.linalg.solve(A, B), None

    def cuda(self, *args, **kwargs):
        return self.to(device)

    torch.solve = solve
    torch.Tensor.cuda = cuda
    if device.type != "cuda":
        torch.cuda.synchronize = lambda *a, **k: None
    sink = io.StringIO()
    try:
        with (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()):
            yield
    finally:
        if saved_solve is None:
            del torch.solve
        else:
            torch.solve = saved_solve
        torch.Tensor.cuda = saved_cuda
        torch.cuda.synchronize = saved_sync


def build(module: types.ModuleType, ours: DEQFusion, **kwargs) -> torch.nn.Module:
    """The release's DEQFusion with the weights of `ours` (which must use block_residual=True,
    the release's `+ z_i`, and carry no input projections)."""
    cfg = ours.config
    if not cfg.block_residual:
        raise OfficialUnavailable("the release's blocks add z_i before the last ReLU: build ours with block_residual=True")
    if cfg.in_dims is not None and any(d != cfg.dim for d in cfg.in_dims):
        raise OfficialUnavailable("the release takes features of one width only")
    if cfg.num_groups != 4:
        raise OfficialUnavailable("the release hard-codes GroupNorm(4, dim)")
    off = module.DEQFusion(cfg.dim, cfg.num_modalities, **kwargs)
    n = cfg.num_modalities
    with torch.no_grad():
        for i in range(n):
            src, dst = ours.modality_blocks[i], off.func_.branches[i]
            for a, b in (("lin1", "conv1"), ("lin2", "conv2"), ("norm1", "gn1"), ("norm2", "gn2"), ("norm3", "gn3")):
                getattr(dst, b).weight.copy_(getattr(src, a).weight)
                getattr(dst, b).bias.copy_(getattr(src, a).bias)
            off.weights[i].copy_(ours.modality_weights[i:i + 1])
        fb, dst = ours.fusion_block, off.func_.branches[n]
        for a, b in (("gate", "gate"), ("fuse", "fuse"), ("norm", "gn3")):
            getattr(dst, b).weight.copy_(getattr(fb, a).weight)
            getattr(dst, b).bias.copy_(getattr(fb, a).bias)
        off.bias.copy_(ours.fuse_bias)
    return off.to(next(ours.parameters()).device, next(ours.parameters()).dtype)


def set_solver(module: types.ModuleType, off: torch.nn.Module, eps: Optional[float] = None,
               stop_mode: Optional[str] = None, b_eps: Optional[float] = None) -> None:
    """Point the release's module at its own Anderson with another tolerance (its forward passes
    only `threshold` and `stop_mode`, so eps is bound here)."""
    anderson = module.anderson
    if eps is not None:
        off.f_solver = lambda f, x0, **kw: anderson(f, x0, eps=eps, **kw)
    if stop_mode is not None:
        off.stop_mode = stop_mode
    if b_eps is not None:
        off.b_solver = lambda f, x0, **kw: anderson(f, x0, eps=b_eps, **kw)


def fused_and_state(module: types.ModuleType, off: torch.nn.Module, xs, compute_jac_loss: bool = False):
    """Run the release's forward: returns (fused, full joint state it returned, its result dict).

    `compute_jac_loss=False` skips the Hutchinson term it computes in training (as ours with
    jac_reg=False and torchdeq, which has none), by calling its featureFusion with the same
    weighted sum its forward() builds."""
    fusion_feature = torch.stack([off.weights[i] * f for i, f in enumerate(xs)], dim=0).sum(dim=0) + off.bias
    fused, jac, result = off.featureFusion(list(xs), fusion_feature, compute_jac_loss=compute_jac_loss)
    return fused, result


def grads_in_our_order(off: torch.nn.Module, ours: DEQFusion, grads: dict) -> torch.Tensor:
    """The release's parameter gradients (a {param: grad} dict) flattened in the order of
    `ours.parameters()`, so that they compare with ours entry by entry."""
    n = ours.config.num_modalities
    pairs = {"modality_weights": torch.cat([_g(grads, off.weights[i]) for i in range(n)]),
             "fuse_bias": _g(grads, off.bias)}
    for i in range(n):
        dst = off.func_.branches[i]
        for a, b in (("lin1", "conv1"), ("lin2", "conv2"), ("norm1", "gn1"), ("norm2", "gn2"), ("norm3", "gn3")):
            for p in ("weight", "bias"):
                pairs[f"modality_blocks.{i}.{a}.{p}"] = _g(grads, getattr(getattr(dst, b), p))
    dst = off.func_.branches[n]
    for a, b in (("gate", "gate"), ("fuse", "fuse"), ("norm", "gn3")):
        for p in ("weight", "bias"):
            pairs[f"fusion_block.{a}.{p}"] = _g(grads, getattr(getattr(dst, b), p))
    return torch.cat([pairs[name].flatten() for name, _ in ours.named_parameters()])


def _g(grads: dict, p: torch.Tensor) -> torch.Tensor:
    g = grads.get(p)
    return torch.zeros_like(p) if g is None else g
