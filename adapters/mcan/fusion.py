"""The nn.Module the patched MCAN ``Net`` holds as ``self.fusion``: DEQFusion over (lang, img), the
stashed per-sample-weighted Jacobian term, and running solver statistics (see the package docstring)."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..common.settings import FusionSettings

MODES = ("train", "eval")


class Tally:
    """Running solver statistics over many forwards (host-side numbers only)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.samples = 0
        self.nstep_sum = 0.0
        self.nstep_max = 0
        self.rel_max = 0.0
        self.status: Dict[str, int] = {}
        self.jac_sum = 0.0
        self.jac_n = 0
        self.back_nstep_sum = 0.0
        self.back_samples = 0
        self.back_nstep_max = 0

    def add(self, stats: Any, jac: Optional[float]) -> None:
        n = int(stats.nstep.numel())
        self.forwards += 1
        self.samples += n
        if n:
            self.nstep_sum += float(stats.nstep.double().sum())
            self.nstep_max = max(self.nstep_max, int(stats.nstep.max()))
            self.rel_max = max(self.rel_max, float(stats.rel_lowest.max()))
        for k, v in stats.counts().items():
            self.status[k] = self.status.get(k, 0) + v
        if jac is not None:
            self.jac_sum += jac
            self.jac_n += 1

    def add_backward(self, back: Any) -> None:
        n = int(back.nstep.numel())
        if n:
            self.back_nstep_sum += float(back.nstep.double().sum())
            self.back_samples += n
            self.back_nstep_max = max(self.back_nstep_max, int(back.nstep.max()))

    def summary(self) -> Dict[str, Any]:
        if not self.forwards:
            return {}
        out: Dict[str, Any] = {
            "forwards": self.forwards, "samples": self.samples,
            "nstep_mean": self.nstep_sum / max(self.samples, 1), "nstep_max": self.nstep_max,
            "rel_residual_max": self.rel_max, "status": dict(self.status),
        }
        if self.jac_n:
            out["jac_loss_mean"] = self.jac_sum / self.jac_n
        if self.back_samples:
            out["backward_nstep_mean"] = self.back_nstep_sum / self.back_samples
            out["backward_nstep_max"] = self.back_nstep_max
        return out

    def line(self, mode: str, first: int) -> str:
        s = self.summary()
        status = ", ".join(f"{k} {v}" for k, v in s["status"].items() if v)
        text = (f"[deqfusion] {mode} forwards {first}-{first + s['forwards'] - 1} ({s['samples']} samples): "
                f"solver steps mean {s['nstep_mean']:.1f} max {s['nstep_max']}; worst rel residual "
                f"{s['rel_residual_max']:.2e}; {status}")
        if "jac_loss_mean" in s:
            text += f"; jac_loss mean {s['jac_loss_mean']:.4g}"
        if "backward_nstep_mean" in s:
            text += f"; adjoint steps mean {s['backward_nstep_mean']:.1f} max {s['backward_nstep_max']}"
        return text


class MCANFusion(nn.Module):
    """DEQ fusion of MCAN's two (B, dim) AttFlat outputs into one (B, dim) vector."""

    def __init__(self, dim: int, settings: FusionSettings, log_file: Optional[str] = None):
        super().__init__()
        from deqfusion import DEQFusion

        self.settings = settings
        self.jac_weight = float(settings.jac_weight)
        kwargs = settings.fusion_kwargs()
        if self.jac_weight == 0.0:
            kwargs.setdefault("jac_reg", False)  # weight 0: do not compute the estimate at all
        self.deq = DEQFusion(dim=int(dim), num_modalities=2, **kwargs)
        self.log_every = int(getattr(settings, "log_every", 0))
        self.log_file = log_file
        # device -> weighted term; nn.DataParallel replicas share this dict (replicate() copies __dict__)
        self._pending: Dict[str, torch.Tensor] = {}
        self.totals = {m: Tally() for m in MODES}     # since the runner last took them
        self._window = {m: Tally() for m in MODES}    # since the last statistics line
        self._count = {m: 0 for m in MODES}
        self.last_stats: Any = None
        self._seen_back: Any = None
        self.jac_terms_taken = 0    # training forwards whose term reached a loss through pop_jac_term

    def forward(self, lang_feat: torch.Tensor, img_feat: torch.Tensor) -> torch.Tensor:
        mode = "train" if self.training else "eval"
        back = getattr(self.last_stats, "backward", None)  # the adjoint solve of the previous forward, if it ran
        if back is not None and back is not self._seen_back:
            self._seen_back = back
            for tally in (self.totals["train"], self._window["train"]):
                tally.add_backward(back)
        out = self.deq([lang_feat, img_feat])
        self.last_stats = out.stats
        jac = None
        if self.training and out.jac_loss.requires_grad:
            self._pending[str(lang_feat.device)] = self.jac_weight * lang_feat.shape[0] * out.jac_loss
            jac = float(out.jac_loss.detach())
        self._record(mode, out.stats, jac)
        return out.fused

    def pop_jac_term(self) -> Any:
        """sum over replicas of jac_weight * B * jac_loss for the latest training forward; then cleared."""
        terms = list(self._pending.values())
        self._pending.clear()
        if not terms:
            return 0
        self.jac_terms_taken += len(terms)
        device = terms[0].device
        return sum(t.to(device) for t in terms)

    def take_totals(self, mode: str) -> Dict[str, Any]:
        """The statistics of ``mode`` forwards since the last call, then reset."""
        out = self.totals[mode].summary()
        self.totals[mode] = Tally()
        return out

    def _record(self, mode: str, stats: Any, jac: Optional[float]) -> None:
        self.totals[mode].add(stats, jac)
        window = self._window[mode]
        window.add(stats, jac)
        self._count[mode] += 1
        if self.log_every and window.forwards >= self.log_every:
            self._write(window.line(mode, self._count[mode] - window.forwards + 1))
            self._window[mode] = Tally()

    def _write(self, line: str) -> None:
        print("\n" + line, flush=True)  # MCAN's own progress line ends with '\r'-updates: start a new line
        sys.stdout.flush()
        if self.log_file:
            try:
                with open(self.log_file, "a+") as fh:  # MCAN opens its log the same way, per write
                    fh.write(line + "\n")
            except OSError:
                pass

    def extra_repr(self) -> str:
        return self.settings.describe()
