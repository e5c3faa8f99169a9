"""Implicit (IFT) backward for a fixed point z* = f(z*) as a torch.autograd.Function.

Given the graph of fz = f(z*) built with z* as a leaf, the incoming gradient dL/dfz is replaced
by the solution g of the adjoint fixed point g = J^T g + dL/dfz (J = df/dz at z*), which autograd
then carries through f's graph to the parameters and inputs (paper Eqs. 17-18). No hooks are
registered and nothing is stored on a module: the solve lives only in this node of the graph.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .solvers import SolverStats, solve


class _ImplicitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fz: torch.Tensor, z_star: torch.Tensor, solver: str, solver_kwargs: Dict[str, Any],
                sink: Optional[Callable[[SolverStats], None]]):
        # the graph fz <- f <- z_star is kept (not saved tensors: we differentiate through it)
        ctx.fz = fz
        ctx.z_star = z_star
        ctx.solver = solver
        ctx.solver_kwargs = solver_kwargs
        ctx.sink = sink
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fz, z_star = ctx.fz, ctx.z_star
        batch = grad.shape[0]

        def adjoint(g: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(fz, z_star, g.view_as(fz), retain_graph=True)
            return vjp.reshape(batch, -1) + grad.reshape(batch, -1)

        with torch.no_grad():
            g, _, stats = solve(ctx.solver, adjoint, torch.zeros_like(grad).reshape(batch, -1),
                                keep_fz=False, **ctx.solver_kwargs)
        if ctx.sink is not None:
            ctx.sink(stats)
        # the adjoint g is the gradient fz passes on to f's graph; z_star is detached from the solve
        return g.view_as(grad), None, None, None, None


def implicit_backward(fz: torch.Tensor, z_star: torch.Tensor, *, solver: str, solver_kwargs: Dict[str, Any],
                      sink: Optional[Callable[[SolverStats], None]] = None) -> torch.Tensor:
    """Return fz unchanged in value, with the implicit gradient attached.

    `fz = f(z_star)` computed with grad, `z_star` a leaf requiring grad. `sink` receives the
    adjoint solve's SolverStats when backward runs.
    """
    return _ImplicitBackward.apply(fz, z_star, solver, solver_kwargs, sink)
