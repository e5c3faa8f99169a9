"""DEQFusion: the paper's fusion layer (Ni et al., 2023, Eqs. 7-13) as one nn.Module."""
from __future__ import annotations

import logging
import random
from typing import Any, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .backward import implicit_backward
from .blocks import ChannelLinear, FusionBlock, ModalityBlock
from .config import FusionConfig
from .jacobian import jacobian_frobenius
from .solvers import ConvergenceTracker, SolverStats, Status, solve
from .warm_start import FixedPointStore, Start, choose_start, first_call_returns

__all__ = ["DEQFusion", "FusionOutput"]

log = logging.getLogger(__name__)


class FusionOutput(NamedTuple):
    """`fused` (B, dim, *spatial); `jac_loss` unweighted scalar (zero in eval or when disabled);
    `stats` per-sample solver statistics. Unpacks as a plain 3-tuple."""

    fused: torch.Tensor
    jac_loss: torch.Tensor
    stats: SolverStats


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:  # pragma: no cover - torch < 2.1
        from torch import _dynamo

        disable = _dynamo.disable
    return disable(fn)


def _compiling() -> bool:
    """True while torch.compile traces (a logging call there would split the graph)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:  # pragma: no cover - torch < 2.3
        from torch import _dynamo

        check = _dynamo.is_compiling
    return bool(check())


@_compiler_disable
def _attach_implicit_grad(f, z_star: torch.Tensor, cfg: FusionConfig, stats: SolverStats, with_jac: bool,
                          restrict=None):
    """One differentiable evaluation f(z*), the Jacobian term, and the implicit backward.

    Returns (output, Jacobian term or None, f(z*) detached). Kept out of torch.compile graphs:
    the Jacobian term needs double backward, which compiled (aot_autograd) graphs do not support,
    and the adjoint solve re-enters autograd.
    """
    if cfg.backward == "phantom":
        return _phantom_grad(f, z_star, cfg, with_jac)
    z_star = z_star.detach().requires_grad_()
    fz = f(z_star)
    jac = jacobian_frobenius(fz, z_star, probes=cfg.jac_probes) if with_jac else None
    first = fz.detach()
    fz = implicit_backward(fz, z_star, solver=cfg.b_solver, solver_kwargs=cfg.solver_kwargs("b"),
                           sink=lambda s: setattr(stats, "backward", s), restrict=restrict)
    return fz, jac, first


def _phantom_grad(f, z_star: torch.Tensor, cfg: FusionConfig, with_jac: bool):
    """Phantom gradient (torchdeq's `grad`/`tau`): `phantom_steps` damped steps
    z <- (1 - tau) z + tau f(z) from z*, differentiated by plain autograd through those steps only.
    One step with tau = 1 is Jacobian-free backprop; the value is f(z*) then, as with IFT."""
    z0 = z_star.detach().requires_grad_(with_jac)
    fz = f(z0)
    first = fz.detach()
    jac = jacobian_frobenius(fz, z0, probes=cfg.jac_probes) if with_jac else None
    tau = cfg.phantom_tau
    z = fz if tau == 1.0 else (1 - tau) * z0 + tau * fz
    for _ in range(cfg.phantom_steps - 1):
        z = f(z) if tau == 1.0 else (1 - tau) * z + tau * f(z)
    return z, jac, first


class DEQFusion(nn.Module):
    """Fuse N modality features into one by finding the joint fixed point of the paper's maps.

    >>> fusion = DEQFusion(dim=512, num_modalities=2)
    >>> fused, jac_loss, stats = fusion([x_text, x_image])     # each (B, 512) or (B, 512, *spatial)

    Options are keyword-only and validated (see `FusionConfig` for every option and its default):
    `in_dims` projects inputs of other widths to `dim`; `ablation` selects a row of the paper's
    Tables 6/7; `mode="unrolled"` with `unroll_steps=k` is the weight-tied network of Fig. 3.
    """

    def __init__(self, dim: int, num_modalities: int, **options: Any):
        super().__init__()
        cfg = FusionConfig.from_kwargs(dim, num_modalities, **options)
        self.config = cfg
        in_dims = cfg.in_dims or (dim,) * num_modalities
        self.in_dims = tuple(in_dims)
        self.projections = nn.ModuleList(ChannelLinear(d, dim) if d != dim else nn.Identity() for d in in_dims)
        solving = cfg.solve_kind != "none"
        uses_x_fuse = cfg.solve_kind == "none" or cfg.use_fusion_block
        # learnable weighted sum x_fuse = sum_i w_i x_i + b, the fused branch's injection
        self.modality_weights = nn.Parameter(torch.ones(num_modalities)) if uses_x_fuse else None
        self.fuse_bias = nn.Parameter(torch.zeros(1)) if uses_x_fuse else None
        self.modality_blocks = (
            nn.ModuleList(ModalityBlock(dim, cfg.num_groups, cfg.block_residual, cfg.input_scale)
                          for _ in range(num_modalities))
            if solving and cfg.use_modality_blocks else None
        )
        self.fusion_block = FusionBlock(dim, cfg.num_groups, gate=cfg.use_gate) if solving and cfg.use_fusion_block else None
        # per-sample fixed points for warm starts (not a buffer: never saved, moved or shared)
        self.warm_store = (FixedPointStore(cfg.warm_store_size, cfg.warm_max_age)
                           if cfg.warm_start and cfg.solve_kind == "deq" else None)
        if cfg.pretrain_steps > 0:  # counts training calls; a buffer, so DDP keeps ranks in step
            self.register_buffer("pretrain_calls", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ public
    def forward(self, features: Sequence[torch.Tensor], *more: Any, z_init: Optional[torch.Tensor] = None,
                sample_ids: Any = None) -> FusionOutput:
        """Fuse `features`, a list of one (B, C_i, *spatial) tensor per modality.

        `z_init` (B, D): a state to start the solve from per sample, e.g. an earlier solve's
        `stats.state` for the same samples (a sample falls back to zeros where it is non-finite or no
        better than zeros; `stats.start` says which). `sample_ids` (B ints): with `warm_start=True`,
        the layer's own store supplies and keeps those states.
        """
        if more:
            raise TypeError(f"DEQFusion takes one list of {self.config.num_modalities} tensors: "
                            f"fusion([{', '.join(f'x_{i + 1}' for i in range(self.config.num_modalities))}]), "
                            f"not {1 + len(more)} separate arguments")
        xs = self._check_inputs(features)
        xs = [proj(x) for proj, x in zip(self.projections, xs)]
        x_fuse = self._weighted_sum(xs) if self.modality_weights is not None else None
        batch, device = xs[0].shape[0], xs[0].device
        zero = torch.zeros((), device=device, dtype=torch.float32)
        kind = self.config.solve_kind
        if kind == "none":
            return FusionOutput(x_fuse, zero, SolverStats.empty(batch, device))
        masks = self._dropout_masks(xs)
        if kind == "unrolled":
            return self._unrolled(xs, x_fuse, masks, zero, self.config.unroll_steps)
        if self._pretraining():
            return self._unrolled(xs, x_fuse, masks, zero, self.config.pretrain_unroll)
        return self._deq(xs, x_fuse, masks, zero, z_init, sample_ids)

    def _pretraining(self) -> bool:
        """True during the first `pretrain_steps` training calls (each such call counts one)."""
        if self.config.pretrain_steps <= 0 or not (self.training and torch.is_grad_enabled()):
            return False
        calls = int(self.pretrain_calls)
        if calls >= self.config.pretrain_steps:
            return False
        self.pretrain_calls.add_(1)
        return True

    def fixed_point_map(self, features: Sequence[torch.Tensor]):
        """(f, readout) for these inputs: the map f of the solve on the flat (B, D) state that
        `stats.state`, `z_init` and the solvers use (no dropout), and readout(state) -> the fused
        output (B, dim, *spatial) of a state. For analysis (residuals, Jacobians) and tests."""
        xs = [proj(x) for proj, x in zip(self.projections, self._check_inputs(features))]
        x_fuse = self._weighted_sum(xs) if self.modality_weights is not None else None
        f, _ = self._problem(xs, x_fuse, [None] * (self.config.num_modalities + 1))
        _, unpack = self._packers(xs[0])
        return f, lambda state: self._fused(unpack(state))

    # ------------------------------------------------------------------ the map
    def _num_states(self) -> int:
        return (self.config.num_modalities if self.modality_blocks is not None else 0) + (self.fusion_block is not None)

    def _step(self, states: List[torch.Tensor], xs: List[torch.Tensor], x_fuse: Optional[torch.Tensor],
              masks: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """One application of the map: modality states first, then the fused state from them (Eq. 9)."""
        n = self.config.num_modalities
        if self.modality_blocks is not None:
            zs = [blk(z, x, m) for blk, z, x, m in zip(self.modality_blocks, states[:n], xs, masks[:n])]
        else:
            zs = xs                               # f_theta = identity: z_i = x_i
        if self.fusion_block is None:
            return zs
        z_fuse = self.fusion_block(states[-1], zs, x_fuse, masks[-1])
        return (zs if self.modality_blocks is not None else []) + [z_fuse]

    def _fused(self, states: List[torch.Tensor]) -> torch.Tensor:
        return states[-1] if self.fusion_block is not None else sum(states)

    def _weighted_sum(self, xs: List[torch.Tensor]) -> torch.Tensor:
        w = self.modality_weights
        return sum(w[i] * x for i, x in enumerate(xs)) + self.fuse_bias

    def _dropout_masks(self, xs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Variational dropout: masks drawn once per forward, shared by every solver iteration."""
        p = self.config.dropout
        n = self.config.num_modalities + 1
        if not self.training or p == 0.0:
            return [None] * n
        keep = 1.0 - p
        return [torch.bernoulli(torch.full_like(xs[0], keep)) / keep for _ in range(n)]

    # ------------------------------------------------------------------ solves
    def _state_dtype(self, x: torch.Tensor) -> torch.dtype:
        if _autocast_enabled(x.device.type):
            return torch.promote_types(x.dtype, torch.float32)
        return x.dtype

    def _packers(self, like: torch.Tensor):
        """(pack, unpack) between the list of states and the solver's flat (B, k*numel) state.
        The batch size is read from the argument, so they serve any subset of the batch."""
        k = self._num_states()
        rest = like.shape[1:]

        def pack(states: List[torch.Tensor]) -> torch.Tensor:
            return torch.stack(states, dim=1).reshape(states[0].shape[0], -1)

        def unpack(flat: torch.Tensor) -> List[torch.Tensor]:
            return list(flat.view(flat.shape[0], k, *rest).unbind(1))

        return pack, unpack

    def _problem(self, xs: List[torch.Tensor], x_fuse: Optional[torch.Tensor], masks: List[Optional[torch.Tensor]]):
        """The map on the flat state, f(z) -> z, and `restrict(idx)`: the same map for the
        samples idx alone (every part of the map treats samples independently), which lets the
        solver stop evaluating f for samples that have converged."""
        pack, unpack = self._packers(xs[0])

        def make(xs_, x_fuse_, masks_):
            def f(flat: torch.Tensor) -> torch.Tensor:
                return pack(self._step(unpack(flat), xs_, x_fuse_, masks_)).to(flat.dtype)
            return f

        def restrict(idx: torch.Tensor):
            def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return None if t is None else t.index_select(0, idx)
            return make([take(x) for x in xs], take(x_fuse), [take(m) for m in masks])

        return make(xs, x_fuse, masks), restrict

    def _deq(self, xs, x_fuse, masks, zero, z_init=None, sample_ids=None) -> FusionOutput:
        cfg = self.config
        _, unpack = self._packers(xs[0])
        f, restrict = self._problem(xs, x_fuse, masks)
        batch = xs[0].shape[0]
        z0 = torch.zeros(batch, self._num_states() * xs[0][0].numel(), device=xs[0].device,
                         dtype=self._state_dtype(xs[0]))
        needs_grad = torch.is_grad_enabled() and (
            any(p.requires_grad for p in self.parameters()) or any(x.requires_grad for x in xs))
        steps = cfg.f_max_iter if self.training else cfg.eval_max_iter
        if steps == 0:
            return self._continue(f, restrict, unpack, z0, z_init, sample_ids, needs_grad, zero)
        with torch.no_grad():
            z0, f_first, start = self._warm_start(f, restrict, z0, z_init, sample_ids)
            # f(z*) comes from the solver's bookkeeping when no graph is needed (saves an
            # evaluation of f); with grad it is recomputed with the graph anyway
            z_star, fz_star, stats = solve(cfg.f_solver, f_first, z0, restrict=restrict, keep_fz=not needs_grad,
                                           **dict(cfg.solver_kwargs("f"), max_iter=steps))
            stats.start = start
        jac_loss = zero
        if needs_grad:
            fz, jac, _ = _attach_implicit_grad(f, z_star, cfg, stats, self._with_jac(), restrict)
            jac_loss = jac if jac is not None else zero
        else:
            fz = fz_star
        return self._finish(fz, jac_loss, stats, sample_ids, unpack)

    def _with_jac(self) -> bool:
        """Whether this training call computes the Jacobian term (every call, or with probability jac_freq)."""
        cfg = self.config
        return self.training and cfg.jac_reg and (cfg.jac_freq >= 1.0 or random.random() < cfg.jac_freq)

    def _finish(self, fz, jac_loss, stats: SolverStats, sample_ids, unpack) -> FusionOutput:
        # the state the output is read from: f(z*) (or the phantom steps' end), one step past z* --
        # so a warm start from it also advances a solve that stopped at its step cap
        stats.state = fz.detach()
        if self.warm_store is not None and sample_ids is not None:
            kept = (stats.status == int(Status.CONVERGED)) | (stats.status == int(Status.MAX_ITER))
            self.warm_store.put(sample_ids, stats.state, kept)
        if not _compiling() and log.isEnabledFor(logging.DEBUG):
            log.debug("DEQFusion forward: %s", stats.summary())
        return FusionOutput(self._fused(unpack(fz)), jac_loss, stats)

    def _continue(self, f, restrict, unpack, z0, z_init, sample_ids, needs_grad, zero) -> FusionOutput:
        """Training with f_max_iter=0: no solve, one step of the map (with its backward) from the start state.

        With warm starts this is fixed-point continuation: each visit of a sample moves its stored
        state one step further, so over training the state follows the fixed point of the
        current weights, at the cost of the backward's own evaluation of f. A stored state is used
        where it is finite (and young enough); one whose step turns out no better than zeros
        (relative residual above 1, or non-finite) is rejected and that call is redone from zeros
        for it. The statistics are those of the step: the residual ||f(z0) - z0|| of the start state.
        """
        cfg = self.config
        batch, dev = z0.shape[0], z0.device
        start = torch.full((batch,), int(Start.COLD), dtype=torch.long, device=dev)
        offered = self._start_candidates(z0, z_init, sample_ids)
        if offered is not None:
            cand, given, usable = offered
            ok = usable & torch.isfinite(cand).all(dim=1)
            z0 = torch.where(ok.view(-1, 1), cand, z0)
            start = torch.where(ok, int(Start.WARM), torch.where(given, int(Start.REJECTED), start))
        with_jac = needs_grad and self._with_jac()
        for attempt in range(2):
            tracker = ConvergenceTracker(z0, max_iter=1, tol=cfg.f_tol, stop_mode=cfg.f_stop_mode,
                                         divergence_factor=cfg.divergence_factor, keep_fz=False)
            stats = SolverStats.empty(batch, dev)      # the adjoint sink's target until the step's own stats exist
            if needs_grad:
                fz, jac, first = _attach_implicit_grad(f, z0, cfg, stats, with_jac, restrict)
            else:
                with torch.no_grad():
                    fz = first = f(z0)
                jac = None
            tracker.update(z0, first)
            _, _, step_stats = tracker.finish("one_step")   # no solver ran: the statistics of the one step
            bad = (start == int(Start.WARM)) & ~(step_stats.rel_lowest <= 1.0)
            if attempt == 1 or not bool(bad.any()):
                break
            z0 = torch.where(bad.view(-1, 1), torch.zeros_like(z0), z0)
            start = torch.where(bad, int(Start.REJECTED), start)
        # the adjoint's stats reach `stats` when backward runs: forward them to the returned object
        for name in ("nstep", "abs_lowest", "rel_lowest", "status", "abs_trace", "rel_trace", "solver",
                     "stop_mode", "tol"):
            setattr(stats, name, getattr(step_stats, name))
        stats.num_evals = step_stats.num_evals * (attempt + 1)     # a redone step counts its first try too
        stats.start = start
        return self._finish(fz, jac if jac is not None else zero, stats, sample_ids, unpack)

    def _warm_start(self, f, restrict, z0: torch.Tensor, z_init, sample_ids):
        """(start state, f for the solver, per-sample Start codes): zeros, or the given / stored states
        where they are usable (see warm_start.choose_start)."""
        batch = z0.shape[0]
        cold = torch.full((batch,), int(Start.COLD), dtype=torch.long, device=z0.device)
        offered = self._start_candidates(z0, z_init, sample_ids)
        if offered is None:
            return z0, f, cold
        cand, given, usable = offered
        z0, fz0, start = choose_start(f, restrict, given, cand, usable)
        return z0, first_call_returns(f, fz0), start

    def _start_candidates(self, z0: torch.Tensor, z_init, sample_ids):
        """(candidate states, given, usable) from `z_init` or the store, or None when none is offered."""
        batch = z0.shape[0]
        store = self.warm_store
        if sample_ids is not None and store is None:
            raise ValueError("sample_ids were passed but this DEQFusion keeps no warm-start store: build it with "
                             "warm_start=True (or pass z_init yourself)")
        if z_init is None and sample_ids is None:
            return None
        if z_init is not None:
            if not isinstance(z_init, torch.Tensor) or tuple(z_init.shape) != tuple(z0.shape):
                got = tuple(z_init.shape) if isinstance(z_init, torch.Tensor) else type(z_init).__name__
                raise ValueError(f"z_init must be a ({batch}, {z0.shape[1]}) tensor (an earlier solve's "
                                 f"stats.state for the same samples), got {got}")
            given = torch.ones(batch, dtype=torch.bool, device=z0.device)
            cand, usable = z_init.detach().to(device=z0.device, dtype=z0.dtype), given
        else:
            if self.training and torch.is_grad_enabled():
                store.clock += 1
            cand, given, age = store.lookup(sample_ids, z0)
            usable = given & ((age <= store.max_age) if store.max_age > 0 else given)
        if not bool(given.any()):
            return None
        return cand, given, usable

    def _unrolled(self, xs, x_fuse, masks, zero, steps: int) -> FusionOutput:
        """Weight-tied network: `steps` applications of the map from zeros, backprop through all."""
        cfg = self.config
        pack, _ = self._packers(xs[0])
        dtype = self._state_dtype(xs[0])
        states = [torch.zeros_like(xs[0], dtype=dtype) for _ in range(self._num_states())]
        # tol -1: no sample "stops" -- every step is traced (Fig. 3); the status is judged at the end
        tracker = ConvergenceTracker(pack(states), max_iter=steps, tol=-1.0, stop_mode=cfg.f_stop_mode,
                                     divergence_factor=float("inf"), keep_fz=False)
        for _ in range(steps):
            new = self._step(states, xs, x_fuse, masks)
            with torch.no_grad():
                tracker.update(pack(states).detach(), pack(new).detach())
            states = new
        _, _, stats = tracker.finish("unrolled")
        stats.abs_lowest, stats.rel_lowest = stats.abs_trace[:, -1], stats.rel_trace[:, -1]
        final = stats.abs_lowest if cfg.f_stop_mode == "abs" else stats.rel_lowest
        stats.status = torch.where(final <= cfg.f_tol, torch.full_like(stats.status, int(Status.CONVERGED)), stats.status)
        stats.tol = cfg.f_tol
        return FusionOutput(self._fused(states), zero, stats)

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        cfg = self.config
        if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
            raise TypeError(f"DEQFusion expects a list of {cfg.num_modalities} tensors (one per modality), "
                            f"got {type(features).__name__}")
        if len(features) != cfg.num_modalities:
            raise ValueError(f"DEQFusion was built for num_modalities={cfg.num_modalities} but got "
                             f"{len(features)} tensors; pass one tensor per modality or rebuild with "
                             f"num_modalities={len(features)}")
        first = features[0]
        for i, x in enumerate(features):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"modality {i}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"modality {i}: expected (batch, channels, *spatial), got shape {tuple(x.shape)}; "
                                 f"add a batch dimension with x.unsqueeze(0)")
            if not x.is_floating_point():
                raise TypeError(f"modality {i}: expected a floating-point tensor, got {x.dtype}; call .float()")
            if x.device != first.device:
                raise ValueError(f"modality {i} is on {x.device} but modality 0 is on {first.device}; "
                                 f"move all inputs to one device")
            if x.dtype != first.dtype:
                raise TypeError(f"modality {i} is {x.dtype} but modality 0 is {first.dtype}; cast all inputs to one dtype")
            if x.shape[0] != first.shape[0]:
                raise ValueError(f"batch sizes differ: modality 0 has {first.shape[0]} samples, modality {i} has "
                                 f"{x.shape[0]}; every modality must describe the same samples")
            if x.shape[1] != self.in_dims[i]:
                raise ValueError(f"modality {i} has {x.shape[1]} channels but DEQFusion expects {self.in_dims[i]} "
                                 f"(dim 1 is channels); pass in_dims=[...] with this width, or check the channel-first layout")
            if x.shape[2:] != first.shape[2:]:
                raise ValueError(f"spatial shapes differ: modality 0 has {tuple(first.shape[2:])}, modality {i} has "
                                 f"{tuple(x.shape[2:])}; resample the features to one spatial size")
        if first.shape[0] == 0:
            raise ValueError("empty batch: DEQFusion got 0 samples; skip the call for an empty batch")
        param = next(self.parameters(), None)
        if param is not None and param.device != first.device:
            raise ValueError(f"inputs are on {first.device} but DEQFusion's parameters are on {param.device}; "
                             f"call fusion.to({str(first.device)!r}) or move the inputs")
        if param is not None and param.dtype != first.dtype and not _autocast_enabled(first.device.type):
            raise TypeError(f"inputs are {first.dtype} but DEQFusion's parameters are {param.dtype}; call "
                            f"fusion.to({first.dtype}) or cast the inputs (or run under torch.autocast)")
        return list(features)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, num_modalities={c.num_modalities}, ablation={c.ablation!r}, mode={c.solve_kind!r}, "
                f"f_solver={c.f_solver!r}, f_max_iter={c.f_max_iter}, f_tol={c.f_tol:g}, f_stop_mode={c.f_stop_mode!r}")
