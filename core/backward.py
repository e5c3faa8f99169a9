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
                sink: Optional[Callable[[SolverStats], None]], restrict: Optional[Callable] = None):
        # the graph fz <- f <- z_star is kept (not saved tensors: we differentiate through it)
        ctx.fz = fz
        ctx.z_star = z_star
        ctx.solver = solver
        ctx.solver_kwargs = solver_kwargs
        ctx.sink = sink
        ctx.restrict = restrict
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fz, z_star = ctx.fz, ctx.z_star
        batch = grad.shape[0]
        grad_flat = grad.reshape(batch, -1)

        def adjoint(g: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(fz, z_star, g.view_as(fz), retain_graph=True)
            return vjp.reshape(batch, -1) + grad_flat

        restrict_adjoint = None
        if ctx.restrict is not None:
            f_restrict = ctx.restrict

            def restrict_adjoint(idx: torch.Tensor):
                # the samples still iterating get a graph of their own (one evaluation of f on
                # them), so that each further step costs a vector-Jacobian product on them only
                z_sub = z_star.detach().index_select(0, idx).requires_grad_()
                with torch.enable_grad():
                    fz_sub = f_restrict(idx)(z_sub)
                grad_sub = grad_flat.index_select(0, idx)

                def adjoint_sub(g: torch.Tensor) -> torch.Tensor:
                    (vjp,) = torch.autograd.grad(fz_sub, z_sub, g.view_as(fz_sub), retain_graph=True)
                    return vjp.reshape(g.shape[0], -1) + grad_sub

                return adjoint_sub

            restrict_adjoint.min_drop = 0.25      # each restriction costs one evaluation of f
        with torch.no_grad():
            # g = J^T g + grad from g = grad: the step from 0 would only give grad back
            g, _, stats = solve(ctx.solver, adjoint, grad_flat.clone(), keep_fz=False, restrict=restrict_adjoint,
                                **ctx.solver_kwargs)
        if ctx.sink is not None:
            ctx.sink(stats)
        # the adjoint g is the gradient fz passes on to f's graph; z_star is detached from the solve
        return g.view_as(grad), None, None, None, None, None


def implicit_backward(fz: torch.Tensor, z_star: torch.Tensor, *, solver: str, solver_kwargs: Dict[str, Any],
                      sink: Optional[Callable[[SolverStats], None]] = None,
                      restrict: Optional[Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = None
                      ) -> torch.Tensor:
    """Return fz unchanged in value, with the implicit gradient attached.

    `fz = f(z_star)` computed with grad, `z_star` a leaf requiring grad. `sink` receives the
    adjoint solve's SolverStats when backward runs. `restrict(idx)`, if given, is f for the
    samples idx alone (see `deqfusion.solvers.solve`): the adjoint solve then stops computing
    for samples whose adjoint has converged.
    """
    return _ImplicitBackward.apply(fz, z_star, solver, solver_kwargs, sink, restrict)
