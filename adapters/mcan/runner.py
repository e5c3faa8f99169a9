"""Drive MCAN's own entry point (``run.py``, its ``Execution``) on a patched clone, unchanged.

One call to :func:`run` is one training run: ``python3 run.py --RUN='train' --MODEL='large'
--SPLIT='train'`` (plus ``--SEED``, ``--VERSION``, ``--NW`` and, if asked, ``--MAX_EPOCH``, ``--BS``,
``--ACCU``), executed in this process by ``runpy`` with MCAN's own argument parsing, config, data
set, training loop and per-epoch evaluation on val.  The runner only

* lays out a working directory: links to the clone's ``cfgs/``, ``core/``, ``utils/`` and ``run.py``,
  ``datasets`` linked to the data folder (MCAN's layout, :mod:`.data`), and fresh ``results/`` and
  ``ckpts/`` (MCAN writes its log, result files and checkpoints there, relative to the working directory);
* installs the run-time compatibility of :mod:`.compat` (YAML loading, word vectors, process state);
* selects the fusion through :func:`deqfusion.adapters.mcan.configure`;
* wraps, for the duration of the run, ``get_optim`` (to count steps for the progress bar) and
  ``Execution.eval`` (to record each epoch's fusion statistics) of the clone's ``core.exec`` module;
* on a machine without CUDA, runs inside :func:`deqfusion.adapters.common.cuda_shim.cuda_redirect`;
* reads back what MCAN reports: per-step losses (its progress line), per-epoch loss and val accuracy
  per answer type (its log file ``results/log/log_run_<VERSION>.txt``).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import runpy
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

from .. import mcan as adapter
from . import compat
from . import data as mcan_data

UPSTREAM_NAME = "mcan"
UPSTREAM_COMMIT = "6b165e9a88800e2a09ece4645a3c8261938897c6"
TRAIN_ARGS = ("--RUN=train", "--MODEL=large", "--SPLIT=train")   # the upstream's command, as in the paper
LINKED = ("cfgs", "core", "utils", "run.py")
RESULT_DIRS = ("results/cache", "results/log", "results/pred", "results/result_test", "ckpts")
ANSWER_TYPES = ("yes/no", "number", "other")


def tiny_overrides(feat_dim: int = 64, boxes: int = 16, hidden: int = 64, layers: int = 2,
                   lr: float = 0.003) -> Dict[str, Any]:
    """A small MCAN for CPU runs on generated data: entries added to ``cfgs/large_model.yml``.

    Everything else (GRAD_ACCU_STEPS 2, Adam with MCAN's warm-up and decay at epochs 10 and 12, the
    evaluation) stays large's.  The defaults learn the generated task beyond the image-blind prior in
    13 epochs of 1000 images (docs/vqa.md); a larger learning rate than large's 5e-5 because the tiny
    model sees a few hundred steps, not 90,000.
    """
    return {"LAYER": int(layers), "HIDDEN_SIZE": int(hidden), "MULTI_HEAD": 4, "FLAT_MLP_SIZE": int(hidden),
            "FLAT_OUT_SIZE": int(hidden), "DROPOUT_R": 0.0, "LR_BASE": float(lr), "IMG_FEAT_SIZE": int(feat_dim),
            "IMG_FEAT_PAD_SIZE": int(boxes)}


class UpstreamError(RuntimeError):
    """The MCAN clone is missing, not patched, or MCAN stopped; the message names the fix."""


def check_upstream(path: Optional[Path] = None) -> Path:
    """The patched clone: ``path``, else where ``./apply_patches.sh mcan`` puts it (one answer for both)."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    fix = (f"run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion apply {UPSTREAM_NAME}`) from the deqfusion "
           f"checkout, or pass --upstream / ${CLONES_ENV} (a folder holding {UPSTREAM_NAME}/) pointing at a clone "
           f"of MILVLG/mcan-vqa at {UPSTREAM_COMMIT[:7]} with patches/{UPSTREAM_NAME}/*.patch applied")
    for name in ("run.py", "core/model/net.py", "core/exec.py", "cfgs/path_cfgs.py"):
        if not (path / name).is_file():
            raise UpstreamError(f"no MCAN clone at {path} ({name} missing); {fix}")
    for name in ("core/model/net.py", "core/exec.py"):
        if "deq_adapter" not in (path / name).read_text(encoding="utf-8", errors="replace"):
            raise UpstreamError(f"{path}/{name} is not patched for DEQ fusion; {fix}")
    return path


@dataclass
class RunSpec:
    data_root: Path                          # MCAN's datasets/ layout (vqa/, coco_extract/)
    settings: adapter.Settings = field(default_factory=adapter.Settings)
    seed: int = 0
    epochs: Optional[int] = None             # --MAX_EPOCH (None: MCAN's 13)
    batch_size: Optional[int] = None         # --BS (None: MCAN's 64)
    grad_accu: Optional[int] = None          # --ACCU (None: large's 2)
    num_workers: int = 0                     # --NW (MCAN's default is 8 loader processes)
    model_overrides: Mapping[str, Any] = field(default_factory=dict)  # added to cfgs/large_model.yml
    vectors: str = "auto"                    # en_vectors_web_lg: real | standin | auto
    device: str = "auto"
    threads: Optional[int] = None            # torch intra-op threads (None: MCAN's 2)
    version: Optional[str] = None            # --VERSION (None: derived from fusion and seed)

    def argv(self) -> List[str]:
        args = ["run.py", *TRAIN_ARGS, f"--SEED={self.seed}", f"--VERSION={self.run_version()}",
                f"--NW={self.num_workers}"]
        for flag, value in (("--MAX_EPOCH", self.epochs), ("--BS", self.batch_size), ("--ACCU", self.grad_accu)):
            if value is not None:
                args.append(f"{flag}={value}")
        return args

    def run_version(self) -> str:
        tag = self.settings.fusion if self.settings.fusion != "deq" else f"deq-{self.settings.ablation}"
        return self.version or f"deqfusion-{tag}-seed{self.seed}"


@dataclass
class RunResult:
    version: str
    seed: int
    fusion: str
    ablation: str
    epochs: List[Dict[str, Any]]             # per epoch: epoch, loss (MCAN's per-sample epoch loss), lr, accuracy, fusion stats
    step_losses: List[float]                 # MCAN's printed per-step loss (per sample of the sub-batch)
    accuracy: Dict[str, float]               # the last epoch's val accuracy: overall, yes/no, number, other
    fusion_grad_norms: Dict[str, float]      # gradient norms of the fusion's parameters after the last step
    deq_log_lines: List[str]                 # the fusion's statistics lines in MCAN's log file
    train_forwards: int                      # training forwards of the fusion (steps x --ACCU)
    jac_terms_taken: int                     # of those, the ones whose Jacobian term reached MCAN's loss
    settings: Dict[str, Any]
    vectors: str
    wall_s: float
    log_text: str = ""
    stdout: str = ""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


_EPOCH_RE = re.compile(r"^epoch = (\d+)\s+loss = (\S+)\s*$\s*^lr = (\S+)", re.M)
_ACC_RE = re.compile(r"^Overall Accuracy is: ([\d.]+)\s*$\s*^(.*)$", re.M)
_TYPE_RE = re.compile(r"(\S+) : ([\d.]+)")
_STEP_RE = re.compile(r"\[epoch\s*(\d+)\]\[step\s*(\d+)/\s*(\d+)\]\[[^\]]*\] loss: (\S+),")


def parse_log(text: str) -> List[Dict[str, Any]]:
    """MCAN's log file -> per epoch {epoch, loss, lr, accuracy}; accuracy lines follow their epoch's loss."""
    epochs = [{"epoch": int(m.group(1)), "loss": float(m.group(2)), "lr": float(m.group(3)), "_at": m.end()}
              for m in _EPOCH_RE.finditer(text)]
    for m in _ACC_RE.finditer(text):
        acc = {"overall": float(m.group(1))}
        acc.update({k: float(v) for k, v in _TYPE_RE.findall(m.group(2))})
        owner = [e for e in epochs if e["_at"] <= m.start()]
        if owner:
            owner[-1]["accuracy"] = acc
    for e in epochs:
        e.pop("_at")
    return epochs


def parse_step_losses(stdout: str) -> List[float]:
    """The per-step losses of MCAN's progress line (``... loss: 12.3456, lr: ...``), in order."""
    return [float(m.group(4)) for m in _STEP_RE.finditer(stdout)]


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    os.symlink(src, dst, target_is_directory=src.is_dir())


def prepare_workdir(work: Path, clone: Path, data_root: Path) -> Path:
    """The working directory MCAN runs in: the clone's code linked, the data linked as datasets/, fresh outputs."""
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        _link(clone / name, work / name)
    _link(Path(data_root).resolve(), work / "datasets")
    for d in RESULT_DIRS:
        (work / d).mkdir(parents=True, exist_ok=True)
    return work


class _Tee(io.TextIOBase):
    """Keep what MCAN prints; also pass it on when echoing."""

    def __init__(self, echo: Optional[Any]):
        self.buffer_ = io.StringIO()
        self.echo = echo

    def write(self, s: str) -> int:
        self.buffer_.write(s)
        if self.echo is not None:
            self.echo.write(s)
        return len(s)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run(
    spec: RunSpec,
    upstream_dir: Optional[Path] = None,
    *,
    workdir: Optional[Path] = None,
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
    echo: bool = False,
) -> RunResult:
    """Train once through MCAN's ``run.py`` and return what it reported, with the fusion's statistics."""
    from ..common.cuda_shim import cuda_redirect, resolve_device

    clone = check_upstream(upstream_dir).resolve()
    root = mcan_data.check_layout(Path(spec.data_root), "train")
    want = int(spec.model_overrides.get("IMG_FEAT_SIZE", 2048))
    have = mcan_data.feature_dim(root)
    if have != want:
        raise mcan_data.DataError(f"the features under {root} are {have}-dimensional but MCAN is configured for "
                                  f"IMG_FEAT_SIZE={want}; generate data with feat_dim={want} or set IMG_FEAT_SIZE={have}")
    device = resolve_device(spec.device)
    version = spec.run_version()
    epochs_seen: List[Dict[str, Any]] = []
    tee = _Tee(sys.stdout if echo else None)

    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcan-")))
        prepare_workdir(work, clone, root)
        stack.enter_context(compat.process_state(str(work), spec.argv()))
        os.chdir(work)
        stack.enter_context(compat.yaml_load(spec.model_overrides))
        stack.enter_context(compat.torch_threads(spec.threads))
        vectors = stack.enter_context(compat.word_vectors(spec.vectors))
        stack.enter_context(adapter.configure(spec.settings))
        built = stack.enter_context(adapter.observe())
        if device.type != "cuda":
            stack.enter_context(cuda_redirect(device))
        stack.enter_context(contextlib.redirect_stdout(tee))

        import core.exec as mcan_exec  # noqa: PLC0415 - the clone's module, imported the way run.py will

        orig_get_optim, orig_eval = mcan_exec.get_optim, mcan_exec.Execution.eval

        def get_optim(*args, **kwargs):
            optim = orig_get_optim(*args, **kwargs)
            if on_step is not None:
                step = optim.step

                def counted_step():
                    step()
                    on_step()
                optim.step = counted_step
            return optim

        def evaluate(self, dataset, state_dict=None, valid=False):
            n_before = len(built)
            train_fusion = built[0] if built else None
            entry: Dict[str, Any] = {"epoch": len(epochs_seen) + 1}
            if train_fusion is not None:
                entry["fusion_train"] = train_fusion.take_totals("train")
            out = orig_eval(self, dataset, state_dict=state_dict, valid=valid)
            if len(built) > n_before:
                entry["fusion_eval"] = built[-1].take_totals("eval")
            epochs_seen.append(entry)
            if on_epoch is not None:
                on_epoch(entry)
            return out

        stack.enter_context(_patched(mcan_exec, "get_optim", get_optim))
        stack.enter_context(_patched(mcan_exec.Execution, "eval", evaluate))
        t0 = time.perf_counter()
        try:
            runpy.run_path(str(work / "run.py"), run_name="__main__")
        except SystemExit as stop:  # check_path's exit(-1), argparse errors
            raise UpstreamError(f"MCAN's run.py stopped (exit {stop.code}); its last output:\n"
                                f"{tee.buffer_.getvalue()[-2000:]}") from None
        wall = time.perf_counter() - t0
        log_path = work / "results" / "log" / f"log_run_{version}.txt"
        log_text = log_path.read_text() if log_path.is_file() else ""
        fusion = built[0] if built else None
        taken = fusion.jac_terms_taken if fusion is not None else 0
        grads = {} if fusion is None else {
            name: (float(p.grad.norm()) if p.grad is not None else float("nan")) for name, p in fusion.named_parameters()}

    stdout = tee.buffer_.getvalue()
    epochs = parse_log(log_text)
    for e, extra in zip(epochs, epochs_seen):
        e.update({k: v for k, v in extra.items() if k != "epoch"})
    final = epochs[-1].get("accuracy", {}) if epochs else {}
    return RunResult(
        version=version, seed=spec.seed, fusion=spec.settings.fusion,
        ablation=spec.settings.ablation if spec.settings.is_deq else "sum",
        epochs=epochs, step_losses=parse_step_losses(stdout), accuracy=final, fusion_grad_norms=grads,
        deq_log_lines=[ln for ln in log_text.splitlines() if ln.startswith("[deqfusion]")],
        train_forwards=sum(e.get("fusion_train", {}).get("forwards", 0) for e in epochs_seen), jac_terms_taken=taken,
        settings={"fusion": spec.settings.fusion, "ablation": spec.settings.ablation,
                  "jac_weight": spec.settings.jac_weight, "options": dict(spec.settings.fusion_kwargs()),
                  "model_overrides": dict(spec.model_overrides), "argv": spec.argv()[1:], "device": str(device),
                  "threads": spec.threads or 2},
        vectors=vectors, wall_s=wall, log_text=log_text, stdout=stdout,
    )


def finite(values: List[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)
