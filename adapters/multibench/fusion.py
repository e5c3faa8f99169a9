"""The torch side of the MultiBench adapter: the fusion module, the objective and the optimiser factory
that the patched example hands to ``training_structures.Supervised_Learning.train``.  No math here:
the fusion is :class:`deqfusion.DEQFusion`; this module only adapts it to MultiBench's calling
conventions and reports what the solver did.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["MultiBenchFusion", "DEQObjective", "FusionLROptimizer", "PhaseStats"]


class PhaseStats:
    """Solver statistics summed over the forwards of one train or eval phase (plain numbers, picklable)."""

    def __init__(self, phase: str):
        self.phase = phase
        self.batches = 0
        self.samples = 0
        self.nstep_sum = 0.0
        self.nstep_max = 0
        self.rel_max = 0.0
        self.abs_max = 0.0
        self.status: Dict[str, int] = {}
        self.jac_sum = 0.0
        self.back_batches = 0
        self.back_nstep_sum = 0.0
        self.back_nstep_max = 0
        self.back_rel_max = 0.0

    def add(self, stats: Any, jac_loss: Optional[float]) -> None:
        n = int(stats.nstep.numel())
        self.batches += 1
        self.samples += n
        if n:
            self.nstep_sum += float(stats.nstep.float().sum())
            self.nstep_max = max(self.nstep_max, int(stats.nstep.max()))
            self.rel_max = max(self.rel_max, float(stats.rel_lowest.max()))
            self.abs_max = max(self.abs_max, float(stats.abs_lowest.max()))
        for key, value in stats.counts().items():
            self.status[key] = self.status.get(key, 0) + int(value)
        if jac_loss is not None:
            self.jac_sum += jac_loss

    def add_backward(self, back: Any) -> None:
        if back is None or not back.nstep.numel():
            return
        self.back_batches += 1
        self.back_nstep_sum += float(back.nstep.float().mean())
        self.back_nstep_max = max(self.back_nstep_max, int(back.nstep.max()))
        self.back_rel_max = max(self.back_rel_max, float(back.rel_lowest.max()))

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "phase": self.phase, "batches": self.batches, "samples": self.samples,
            "nstep_mean": self.nstep_sum / self.samples if self.samples else 0.0, "nstep_max": self.nstep_max,
            "rel_residual_max": self.rel_max, "abs_residual_max": self.abs_max,
            "status": {k: v for k, v in self.status.items() if v},
        }
        if self.phase == "train":
            out["jac_loss_mean"] = self.jac_sum / self.batches if self.batches else 0.0
        if self.back_batches:
            out["backward"] = {"batches": self.back_batches, "nstep_mean": self.back_nstep_sum / self.back_batches,
                               "nstep_max": self.back_nstep_max, "rel_residual_max": self.back_rel_max}
        return out


def format_phase(index: int, s: Dict[str, Any]) -> str:
    """One log line for a finished phase, e.g. ``[deqfusion] DEQ fusion, train phase 3: ...``."""
    status = ", ".join(f"{k} {v}" for k, v in s["status"].items())
    line = (f"[deqfusion] DEQ fusion, {s['phase']} phase {index} ({s['batches']} batches, {s['samples']} samples): "
            f"forward steps mean {s['nstep_mean']:.1f} max {s['nstep_max']}, worst rel residual "
            f"{s['rel_residual_max']:.2e}; {status}")
    if "backward" in s:
        b = s["backward"]
        line += f"; backward steps mean {b['nstep_mean']:.1f} max {b['nstep_max']}, worst rel residual " \
                f"{b['rel_residual_max']:.2e}"
    if "jac_loss_mean" in s:
        line += f"; jac loss {s['jac_loss_mean']:.4g}"
    return line


class MultiBenchFusion(nn.Module):
    """DEQFusion as MultiBench's ``fusion`` argument: ``forward(list of (B, C_i))`` -> plain tuple
    ``(fused (B, dim), jac_loss, stats)``.

    ``MMDL.forward`` keeps the tuple in ``model.fuseout`` (the objective reads ``jac_loss`` there) and
    gives ``out[0]`` to the head; it checks ``type(out) is tuple``, so this returns a plain tuple, not
    DEQFusion's FusionOutput NamedTuple.  The solver statistics of every forward are summed per phase
    (a run of train-mode or of eval-mode forwards); when the mode changes, the finished phase goes to
    ``phase_log`` and, with ``log_stats``, is printed as one ``[deqfusion]`` line beside MultiBench's own.
    """

    def __init__(self, in_dims: Sequence[int], settings: Any, dim: Optional[int] = None):
        super().__init__()
        from deqfusion import DEQFusion

        in_dims = [int(d) for d in in_dims]
        self.dim = int(dim or in_dims[0])
        kwargs = settings.fusion_kwargs()
        if any(d != self.dim for d in in_dims):
            kwargs.setdefault("in_dims", in_dims)
        self.settings = settings
        self.log_stats = bool(settings.log_stats)
        self.deq = DEQFusion(dim=self.dim, num_modalities=len(in_dims), **kwargs)
        self.phase_log: List[Dict[str, Any]] = []
        self._phase: Optional[PhaseStats] = None
        self._pending_backward: Any = None

    def forward(self, modalities: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        out = self.deq(list(modalities))
        phase = "train" if self.training else "eval"
        if self._phase is None or self._phase.phase != phase:
            self.flush_stats()
            self._phase = PhaseStats(phase)
        self._take_backward()
        self._phase.add(out.stats, float(out.jac_loss.detach()) if self.training else None)
        if self.training and torch.is_grad_enabled():
            self._pending_backward = out.stats  # its .backward is filled in when loss.backward() runs
        return (out.fused, out.jac_loss, out.stats)

    def _take_backward(self) -> None:
        pending, self._pending_backward = self._pending_backward, None
        if pending is not None and self._phase is not None:
            self._phase.add_backward(getattr(pending, "backward", None))

    def train(self, mode: bool = True) -> MultiBenchFusion:
        if mode != self.training:
            self.flush_stats()
        return super().train(mode)

    def flush_stats(self) -> Optional[Dict[str, Any]]:
        """Close the current phase: append its summary to ``phase_log`` (and print it); None if empty."""
        self._take_backward()
        phase, self._phase = self._phase, None
        if phase is None or not phase.batches:
            return None
        summary = phase.summary()
        self.phase_log.append(summary)
        if self.log_stats:
            print(format_phase(len(self.phase_log), summary), flush=True)
        return summary

    def __getstate__(self) -> Dict[str, Any]:  # torch.save(model): keep numbers, not the last solve's tensors
        state = dict(super().__getstate__())
        state["_pending_backward"] = None
        state["_phase"] = None  # a loaded copy starts its own phase (the test pass), not the saver's open one
        return state

    def extra_repr(self) -> str:
        return self.settings.describe()


class DEQObjective:
    """MultiBench custom objective ``(pred, truth, args) -> base(pred, truth) + jac_weight * jac_loss``.

    ``train`` fills ``args['fused']`` with ``model.fuseout``, the fusion's ``(fused, jac_loss, stats)``
    tuple, when it is given ``objective_args_dict={}``.  Targets are cast to float on the prediction's
    device, as ``deal_with_objective`` does for the built-in BCEWithLogitsLoss.
    """

    def __init__(self, base: Callable[..., torch.Tensor], jac_weight: float):
        self.base = base
        self.jac_weight = float(jac_weight)

    def __call__(self, pred: torch.Tensor, truth: torch.Tensor, args: Optional[Dict[str, Any]]) -> torch.Tensor:
        if args is None:
            raise TypeError("DEQObjective needs MultiBench's argument dict: pass objective_args_dict={} to "
                            "training_structures.Supervised_Learning.train (the patched example does)")
        fused = args.get("fused")
        if not (isinstance(fused, tuple) and len(fused) >= 2 and torch.is_tensor(fused[1])):
            raise ValueError("args['fused'] is not the (fused, jac_loss, stats) tuple of MultiBenchFusion; build the "
                             "fusion with deqfusion.adapters.multibench.build_fusion")
        loss = self.base(pred, truth.float().to(pred.device))
        return loss + self.jac_weight * fused[1].mean()

    def __repr__(self) -> str:
        return f"DEQObjective({self.base!r} + {self.jac_weight:g} * jac_loss)"


class FusionLROptimizer:
    """MultiBench ``optimtype``: ``train`` calls ``optimtype(params, lr=lr, weight_decay=wd)`` with one flat
    list; this builds ``optimtype`` with two parameter groups, everything else at ``lr`` and the fusion's
    parameters at ``fusion_lr``.  ``last`` is the optimiser it built most recently."""

    def __init__(self, optimtype: Callable[..., torch.optim.Optimizer], fusion: nn.Module, fusion_lr: float):
        self.optimtype = optimtype
        self.fusion = fusion
        self.fusion_lr = float(fusion_lr)
        self.last: Optional[torch.optim.Optimizer] = None

    def __call__(self, params: Any, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
        params = list(params)
        mine = {id(p) for p in self.fusion.parameters()}
        rest = [p for p in params if id(p) not in mine]
        fused = [p for p in params if id(p) in mine]
        if not fused:
            raise ValueError("none of the parameters handed to the optimiser belongs to the DEQ fusion; pass the "
                             "fusion that train() received to deqfusion.adapters.multibench.optimizer")
        groups = [{"params": rest, "name": "encoders+head"}, {"params": fused, "lr": self.fusion_lr, "name": "fusion"}]
        self.last = self.optimtype(groups, lr=lr, **kwargs)
        return self.last

    def __repr__(self) -> str:
        name = getattr(self.optimtype, "__name__", repr(self.optimtype))
        return f"FusionLROptimizer({name}, fusion lr {self.fusion_lr:g})"
