"""Strict, validated options for DEQFusion.

Every option is a field of `FusionConfig`; an unknown or misspelled keyword is an error that
names the closest valid option (torchdeq silently ignores them: its issue #12). Names follow
torchdeq (`f_solver`, `f_max_iter`, `f_tol`, `f_stop_mode`, `b_*`), so DEQ users know them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Tuple

from .solvers import SOLVERS, STOP_MODES

__all__ = ["FusionConfig", "ABLATIONS", "ConfigError", "MODES", "BACKWARDS", "option_names", "unknown_option_message"]


class ConfigError(ValueError):
    """A DEQFusion option has a bad value; the message names the fix."""


MODES = ("deq", "unrolled")
BACKWARDS = ("implicit", "phantom")

# The rows of the paper's Tables 6 and 7: name -> (modality blocks f_theta, fused block f_fuse, gate, solve)
# solve: "deq" = fixed point (or unrolled if mode="unrolled"), "single" = one pass from zeros, "none" = no f.
ABLATIONS: Dict[str, Tuple[bool, bool, bool, str]] = {
    "weighted_sum": (False, False, False, "none"),   # fused = sum_i w_i x_i + b
    "no_deq": (True, True, True, "single"),          # f_theta + f_fuse, one pass, no DEQ
    "modality_deq": (True, False, False, "deq"),     # f_theta + DEQ, fused = sum_i z_i*
    "fusion_deq": (False, True, True, "deq"),        # f_fuse + DEQ, f_theta = identity (z_i = x_i)
    "full": (True, True, True, "deq"),               # the paper's DEQ fusion
    "no_gate": (True, True, False, "deq"),           # full, purify step removed: z'_i = z_i
}

# Names used by the official release, torchdeq and locuslab/deq, mapped to ours.
ALIASES = {
    "channel_dim": "dim", "num_modals": "num_modalities", "f_thres": "f_max_iter", "b_thres": "b_max_iter",
    "threshold": "f_max_iter", "stop_mode": "f_stop_mode", "eps": "f_tol", "solver": "f_solver",
    "num_layers": "unroll_steps", "deq": "mode", "f_anderson_m": "anderson_m", "m": "anderson_m",
    "lam": "anderson_lam", "beta": "anderson_beta", "jacobian_weight": "(none: weight jac_loss yourself)",
    "jac_loss_weight": "(none: weight jac_loss yourself)", "jac_loss_freq": "jac_freq", "vecs": "jac_probes",
    "num_groups_norm": "num_groups", "ift": "backward", "n_states": "(none)",
    "grad": "phantom_steps", "tau": "phantom_tau", "pretrain_iters": "pretrain_steps",
}


@dataclass(frozen=True)
class FusionConfig:
    """All options of DEQFusion. Defaults follow the authors' release where it is sound.

    Forward: Anderson (m=6, lam=1e-4, beta=1), at most 55 steps (the release's default f_thres;
    its BRCA/MM-IMDB scripts raise it to 105). Tolerances are per sample and relative, 1e-5 for
    the forward and the adjoint solve: the release's absolute 1e-3 over the whole batch means a
    different per-sample accuracy for every batch size and width, and its adjoint eps of 1e-3 gave
    ~11 % gradient error. Measured (tests/test_layer_gradients.py): per-sample abs 1e-3 or rel 1e-4
    gave 1.04e-4 relative gradient error on a float64 instance, rel 1e-5 gave 2.6e-5.
    `block_residual=False` is paper Eq. 8; True adds the release's `+ z_i` before the last ReLU of
    f_theta. Eq. 8 is the default because it is measured to be better posed: on small float64
    instances (tests/test_layer_gradients.py) the `+ z_i` form has several fixed points, and
    Anderson/Broyden land on an unstable one (spectral radius of J 1.34) that plain iteration
    never reaches, while Eq. 8 gives one attracting fixed point (spectral radius 0.02-0.7).
    """

    dim: int
    num_modalities: int
    in_dims: Optional[Tuple[int, ...]] = None
    ablation: str = "full"
    mode: str = "deq"
    unroll_steps: int = 1
    num_groups: int = 4
    block_residual: bool = False
    input_scale: bool = False   # not in the paper: z_i keeps the per-sample RMS of x_i (see ModalityBlock)
    dropout: float = 0.0
    # forward solve
    f_solver: str = "anderson"
    f_max_iter: int = 55        # training solve; 0 = no solve, one step from the start state (continuation)
    eval_f_max_iter: Optional[int] = None   # the solve outside training (None = f_max_iter), as in torchdeq
    f_tol: float = 1e-5
    f_stop_mode: str = "rel"
    # backward (adjoint) solve
    b_solver: str = "anderson"
    b_max_iter: int = 56
    b_tol: float = 1e-5
    b_stop_mode: str = "rel"
    # solver details
    anderson_m: int = 6
    anderson_lam: float = 1e-4
    anderson_beta: float = 1.0
    broyden_memory: int = 30
    check_every: int = 1
    divergence_factor: float = 1e4
    # Jacobian regularisation (Hutchinson estimate of ||J||_F^2 per element)
    jac_reg: bool = True
    jac_probes: int = 2
    jac_freq: float = 1.0
    # backward: "implicit" (IFT, the paper's Eqs. 17-18) or "phantom" (torchdeq's phantom gradient:
    # backprop through phantom_steps damped steps z <- (1 - tau) z + tau f(z) from z*; 1 step with
    # tau 1 is Jacobian-free backprop). Not the same gradient: phantom is an approximation of IFT's.
    backward: str = "implicit"
    phantom_steps: int = 1
    phantom_tau: float = 1.0
    # warm starts from a per-sample store keyed by the caller's `sample_ids` (see warm_start.py)
    warm_start: bool = False
    warm_store_size: int = 65536
    warm_max_age: int = 0
    # warm-up: the first pretrain_steps training calls run pretrain_unroll weight-tied steps
    # (backprop through them) instead of the DEQ solve, as locuslab/deq's pretraining does
    pretrain_steps: int = 0
    pretrain_unroll: int = 3

    @classmethod
    def from_kwargs(cls, dim: int, num_modalities: int, **options: Any) -> FusionConfig:
        valid = option_names()
        for key in options:
            if key not in valid:
                raise TypeError(unknown_option_message(key, valid))
        if "in_dims" in options and options["in_dims"] is not None:
            options["in_dims"] = tuple(int(d) for d in options["in_dims"])
        cfg = cls(dim=dim, num_modalities=num_modalities, **options)
        if cfg.ablation == "no_deq" and "unroll_steps" not in options:
            cfg = replace(cfg, unroll_steps=1)
        cfg.validate()
        return cfg

    # --- derived switches -------------------------------------------------------------------
    @property
    def use_modality_blocks(self) -> bool:
        return ABLATIONS[self.ablation][0]

    @property
    def use_fusion_block(self) -> bool:
        return ABLATIONS[self.ablation][1]

    @property
    def use_gate(self) -> bool:
        return ABLATIONS[self.ablation][2]

    @property
    def solve_kind(self) -> str:
        """'none', 'unrolled' (weight-tied, backprop through steps) or 'deq' (root solve + IFT)."""
        kind = ABLATIONS[self.ablation][3]
        if kind == "none":
            return "none"
        if kind == "single" or self.mode == "unrolled":
            return "unrolled"
        return "deq"

    @property
    def eval_max_iter(self) -> int:
        """Forward solver steps outside training (eval mode): eval_f_max_iter, else f_max_iter."""
        return self.f_max_iter if self.eval_f_max_iter is None else self.eval_f_max_iter

    def solver_kwargs(self, which: str) -> Dict[str, Any]:
        """Keyword arguments for deqfusion.solvers.solve() for the forward ('f') or backward ('b') solve."""
        name = getattr(self, f"{which}_solver")
        kw: Dict[str, Any] = dict(max_iter=getattr(self, f"{which}_max_iter"), tol=getattr(self, f"{which}_tol"),
                                  stop_mode=getattr(self, f"{which}_stop_mode"), check_every=self.check_every,
                                  divergence_factor=self.divergence_factor)
        if name == "anderson":
            kw.update(m=self.anderson_m, lam=self.anderson_lam, beta=self.anderson_beta)
        elif name == "broyden":
            kw.update(memory=self.broyden_memory)
        return kw

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.dim, int) and self.dim > 0, f"dim must be a positive int, got {self.dim!r}")
        need(isinstance(self.num_modalities, int) and self.num_modalities >= 1,
             f"num_modalities must be an int >= 1, got {self.num_modalities!r}")
        need(isinstance(self.num_groups, int) and self.num_groups >= 1, f"num_groups must be an int >= 1, got {self.num_groups!r}")
        need(self.dim % self.num_groups == 0,
             f"dim={self.dim} is not divisible by num_groups={self.num_groups} (GroupNorm needs it); "
             f"pick a dim that is a multiple of {self.num_groups} or set num_groups to a divisor of {self.dim}")
        if self.in_dims is not None:
            need(len(self.in_dims) == self.num_modalities,
                 f"in_dims has {len(self.in_dims)} entries but num_modalities={self.num_modalities}; give one width per modality")
            need(all(d > 0 for d in self.in_dims), f"in_dims must be positive, got {self.in_dims}")
        need(self.ablation in ABLATIONS, f"unknown ablation {self.ablation!r}; choose one of {list(ABLATIONS)}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.unroll_steps >= 1, f"unroll_steps must be >= 1, got {self.unroll_steps}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        for which in ("f", "b"):
            solver = getattr(self, f"{which}_solver")
            need(solver in SOLVERS, f"{which}_solver={solver!r} is unknown; choose one of {sorted(SOLVERS)}")
            least = 0 if which == "f" else 1
            need(isinstance(getattr(self, f"{which}_max_iter"), int) and getattr(self, f"{which}_max_iter") >= least,
                 f"{which}_max_iter must be an int >= {least}" + (" (0: no training solve, see eval_f_max_iter)"
                                                                  if which == "f" else ""))
            need(getattr(self, f"{which}_tol") >= 0, f"{which}_tol must be >= 0")
            mode = getattr(self, f"{which}_stop_mode")
            need(mode in STOP_MODES, f"{which}_stop_mode={mode!r} is unknown; choose one of {STOP_MODES}")
        need(self.eval_f_max_iter is None or (isinstance(self.eval_f_max_iter, int) and self.eval_f_max_iter >= 1),
             f"eval_f_max_iter must be an int >= 1 (or None: f_max_iter), got {self.eval_f_max_iter!r}")
        need(self.f_max_iter >= 1 or self.eval_f_max_iter is not None,
             "f_max_iter=0 (training takes one step of the map from the start state, no solve) needs a solve for "
             "evaluation: set eval_f_max_iter too, e.g. f_max_iter=0, eval_f_max_iter=12")
        need(self.anderson_m >= 1, "anderson_m must be >= 1")
        need(self.anderson_lam >= 0, "anderson_lam must be >= 0")
        need(0 < self.anderson_beta <= 1, "anderson_beta must be in (0, 1]")
        need(self.broyden_memory >= 1, "broyden_memory must be >= 1")
        need(self.check_every >= 0, "check_every must be >= 0 (0 = never exit early: a fixed number of steps)")
        need(self.divergence_factor > 1, "divergence_factor must be > 1")
        need(self.jac_probes >= 1, "jac_probes must be >= 1")
        need(self.backward in BACKWARDS, f"backward must be one of {BACKWARDS}, got {self.backward!r} "
             "('implicit' = IFT, 'phantom' = phantom gradient)")
        need(isinstance(self.phantom_steps, int) and self.phantom_steps >= 1, "phantom_steps must be an int >= 1")
        need(0.0 < self.phantom_tau <= 1.0, f"phantom_tau (damping) must be in (0, 1], got {self.phantom_tau}")
        need(self.warm_store_size >= 1, "warm_store_size must be >= 1")
        need(self.warm_max_age >= 0, "warm_max_age must be >= 0 (0 = no limit)")
        need(self.pretrain_steps >= 0, "pretrain_steps must be >= 0")
        need(self.pretrain_unroll >= 1, "pretrain_unroll must be >= 1")
        need(0.0 <= self.jac_freq <= 1.0, f"jac_freq is a probability per training step, in [0, 1]; got {self.jac_freq}")


def option_names() -> List[str]:
    """The keyword options of DEQFusion (every FusionConfig field but dim and num_modalities)."""
    return [f.name for f in fields(FusionConfig) if f.name not in ("dim", "num_modalities")]


def unknown_option_message(key: str, valid) -> str:
    """'DEQFusion got an unknown option ...', with the closest valid name or the alias it stands for."""
    hint = ALIASES.get(key)
    if hint is None:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = close[0] if close else None
    if hint and hint.startswith("("):
        suggestion = f" There is no such option here {hint}."
    elif hint:
        suggestion = f" Did you mean {hint!r}?"
    else:
        suggestion = ""
    return f"DEQFusion got an unknown option {key!r}.{suggestion} Valid options: {', '.join(valid)}"
