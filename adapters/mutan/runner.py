"""Drive block's own training entry (``python -m bootstrap.run``) on the clone, one run per call.

One :class:`RunSpec` is one experiment: the options file (``mutan`` or ``mutan_deq``), the data, and
bootstrap flags.  :func:`run` starts ``python -m deqfusion.adapters.mutan.run -o <options> ...`` (bootstrap's
entry with the era compatibility of :mod:`deqfusion.adapters.mutan.compat`) in the clone's root, in the
Python that has bootstrap.pytorch (``--python``; the current one by default), with stdout and stderr in
``<exp dir>.stdout.log`` beside the experiment folder (which bootstrap must create itself).  block's metric evaluates the open-ended VQA accuracy in a *background*
process after each epoch (``compute_oe_accuracy ... &``); :func:`run` waits for those to write
``logs_val_oe.json`` before it reads the results:

* ``logs.json`` (bootstrap's logger): per-batch and per-epoch loss, top-1/top-5 accuracy, DEQ statistics;
* ``logs_val_oe.json`` (block's VQA evaluation): overall and per answer type (yes/no, number, other).

The epoch reported is block's own choice, the best ``eval_epoch.accuracy_top1`` (its saving criterion and
the ``--best`` of ``block.compare_vqa2_val``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import UPSTREAM_COMMIT, UPSTREAM_NAME
from . import options as options_files
from .data import DataPaths

ANSWER_TYPES = ("yes/no", "number", "other")
# bootstrap flags that shrink a run to a smoke test on generated data (the tests' and --quick's sizes)
QUICK_FLAGS = ("--model.network.attention.fusion.mm_dim", "64", "--model.network.attention.fusion.rank", "4",
               "--model.network.classif.fusion.mm_dim", "64", "--model.network.classif.fusion.rank", "4")
QUICK_DEQ_FLAGS = ("--model.network.deq.dim", "64", "--model.network.deq.options.f_max_iter", "12",
                   "--model.network.deq.options.b_max_iter", "12")


class UpstreamError(RuntimeError):
    """The block clone is missing, or the run failed; the message names the fix or the log."""


def check_upstream(path: Optional[Path] = None) -> Path:
    """The block clone: ``path``, else where ``./apply_patches.sh mutan`` puts it."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    if not (path / "block" / "models" / "networks" / "vqa_net.py").is_file():
        raise UpstreamError(
            f"no block.bootstrap.pytorch clone at {path}: run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion "
            f"apply {UPSTREAM_NAME}`) from the deqfusion checkout, or pass --upstream / ${CLONES_ENV} (a folder "
            f"holding {UPSTREAM_NAME}/) pointing at a clone of Cadene/block.bootstrap.pytorch at {UPSTREAM_COMMIT[:7]}")
    return path


@dataclass
class RunSpec:
    row: str                                 # "mutan" or "mutan_deq" (the options file)
    exp_dir: Path
    data: DataPaths
    nans: Optional[int] = None               # answers; None = the options' 3000 (real data)
    epochs: Optional[int] = None             # None = the options' 22
    batch_size: Optional[int] = None
    cuda: bool = False
    threads: int = 1
    workers: Optional[int] = 0               # dataset.nb_threads (DataLoader workers); None = the options' 4
    seed: Optional[int] = None               # misc.seed; None = the options' 1337
    quick: bool = False                      # QUICK_FLAGS (+ QUICK_DEQ_FLAGS): tiny fusions, for smoke runs
    view: Optional[str] = None               # view.name (plotly needs plotly<4 + seaborn; tensorboard is lighter)
    flags: Sequence[str] = ()                # more bootstrap flags, e.g. --model.network.deq.jac_weight 0.01
    grad_log: bool = False                   # record the fusion's gradients (run.py --deqfusion-grad-log)
    python: str = sys.executable
    timeout: Optional[float] = None          # of the training process, seconds
    eval_timeout: float = 300.0              # for block's background VQA evaluations after training

    def options_path(self) -> Path:
        return options_files.path(self.row)

    def command(self) -> List[str]:
        cmd = [self.python, "-m", "deqfusion.adapters.mutan.run", "-o", str(self.options_path()),
               "--exp.dir", str(self.exp_dir), "--misc.cuda", str(bool(self.cuda)), *self.data.flags()]
        if self.nans is not None:
            cmd += ["--dataset.nans", str(self.nans), "--model.network.classif.fusion.output_dim", str(self.nans)]
        for flag, value in (("--engine.nb_epochs", self.epochs), ("--dataset.batch_size", self.batch_size),
                            ("--dataset.nb_threads", self.workers), ("--misc.seed", self.seed),
                            ("--view.name", self.view)):
            if value is not None:
                cmd += [flag, str(value)]
        if self.quick:
            cmd += list(QUICK_FLAGS) + (list(QUICK_DEQ_FLAGS) if self.row == "mutan_deq" else [])
        cmd += list(self.flags)
        if self.grad_log:
            cmd += ["--deqfusion-grad-log", str(self.exp_dir / "fusion_gradients.json")]
        return cmd


@dataclass
class RunResult:
    row: str
    exp_dir: str
    command: List[str]
    wall_s: float
    epochs: int
    best_epoch: int                          # block's choice: best eval_epoch.accuracy_top1
    oe: Dict[str, float]                     # VQA accuracy at best_epoch: overall, yes/no, number, other
    oe_last: Dict[str, float]                # the same at the last epoch
    top1: List[float]                        # eval_epoch.accuracy_top1 per epoch
    train_loss: List[float]                  # train_batch.loss, every step
    eval_loss: List[float]                   # eval_epoch.loss per epoch
    deq: Dict[str, List[float]] = field(default_factory=dict)   # DEQ statistics per epoch (train_/eval_epoch)
    gradients: List[Dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def wait_for_evaluations(exp_dir: Path, epochs: int, timeout: float = 300.0) -> Dict[str, Any]:
    """The VQA evaluation log ``logs_val_oe.json``, once block's background evaluations are done: each
    removes its ``results/<split>/epoch,<n>`` folder when it has written its numbers.  After ``timeout``
    seconds, whatever the log holds (an evaluation that crashed leaves its folder; its traceback is in the
    run's ``.stdout.log``)."""
    exp_dir = Path(exp_dir)
    deadline = time.monotonic() + timeout
    while True:
        values = _read_json(exp_dir / "logs_val_oe.json")
        done = len(values.get("eval_epoch.epoch", [])) >= epochs
        busy = any(exp_dir.glob("results/*/epoch,*"))
        if (done and not busy) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def _oe_at(oe: Dict[str, Any], epoch: int) -> Dict[str, float]:
    epochs = oe.get("eval_epoch.epoch", [])
    if epoch not in epochs:
        return {}
    i = epochs.index(epoch)
    out = {"overall": oe["eval_epoch.overall"][i]}
    for t in ANSWER_TYPES:
        key = f"eval_epoch.perAnswerType.{t}"
        if key in oe:
            out[t] = oe[key][i]
    return out


def run(spec: RunSpec, clone: Optional[Path] = None, echo: bool = False) -> RunResult:
    """Train one row with block's own entry point and read its logs."""
    clone = check_upstream(clone)
    exp_dir = Path(spec.exp_dir)
    if exp_dir.exists():
        raise UpstreamError(f"{exp_dir} exists: bootstrap would ask whether to erase it; pick a new folder")
    exp_dir.parent.mkdir(parents=True, exist_ok=True)
    stdout_log = exp_dir.parent / f"{exp_dir.name}.stdout.log"
    cmd = spec.command()
    env = dict(os.environ)
    if spec.threads > 0:
        env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    t0 = time.perf_counter()
    with open(stdout_log, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=str(clone), env=env, stdin=subprocess.DEVNULL,
                                  stdout=None if echo else log, stderr=subprocess.STDOUT if not echo else None,
                                  timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            raise UpstreamError(f"{spec.row}: bootstrap.run ran past {spec.timeout:g} s; see {stdout_log}") from None
    wall = time.perf_counter() - t0
    logs = _read_json(exp_dir / "logs.json")
    if proc.returncode != 0 or not logs:
        raise UpstreamError(f"{spec.row}: bootstrap.run failed (exit {proc.returncode}); see {exp_dir}/logs.txt "
                            f"and {stdout_log}")
    epochs = len(logs.get("eval_epoch.epoch", []))
    top1 = [float(v) for v in logs.get("eval_epoch.accuracy_top1", [])]
    oe = wait_for_evaluations(exp_dir, epochs, spec.eval_timeout) if epochs else {}
    best = max(range(epochs), key=lambda i: (top1[i], -i)) if top1 else -1
    deq = {k: list(v) for k, v in logs.items()
           if k.startswith(("train_epoch.", "eval_epoch.")) and k.split(".", 1)[1] in
           ("jac_loss", "loss_vqa", "deq_nstep", "deq_rel_residual_max", "deq_converged")}
    grads = _read_json(exp_dir / "fusion_gradients.json") if spec.grad_log else []
    return RunResult(
        row=spec.row, exp_dir=str(exp_dir), command=cmd, wall_s=wall, epochs=epochs, best_epoch=best,
        oe=_oe_at(oe, best), oe_last=_oe_at(oe, epochs - 1), top1=top1,
        train_loss=[float(v) for v in logs.get("train_batch.loss", [])],
        eval_loss=[float(v) for v in logs.get("eval_epoch.loss", [])], deq=deq,
        gradients=grads if isinstance(grads, list) else [])
