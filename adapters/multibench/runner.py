"""Run MultiBench's patched MM-IMDB example (``examples/multimedia/mmimdb_simple_late_fusion.py``) as it is.

One call to :func:`run` executes the example script of a patched clone (``third_party/multibench``
by default) with ``runpy``, in this process, so that its own ``get_dataloader``, ``train`` and
``test`` do the work.  The runner only sets the stage and listens:

* the clone is first on ``sys.path`` (MultiBench imports ``datasets``, ``unimodals``, ``fusions`` ...
  as top-level packages) and whatever modules of those names were loaded before are put back after;
* the fusion settings (with the data file) go through :func:`deqfusion.adapters.multibench.configure`,
  the dead imports through the adapter's import stand-ins, bare ``.cuda()`` calls through
  :func:`~deqfusion.adapters.common.cuda_shim.cuda_redirect` when there is no GPU;
* ``random``, ``numpy`` and ``torch`` are seeded (MultiBench sets no seed); the checkpoint
  ``best_lf.pt`` goes to a working folder;
* three module attributes are wrapped for the duration of the call (the files are untouched):
  ``get_data.get_dataloader`` (to apply ``batch_size`` / ``num_workers`` when asked, and, for a file
  whose ``split`` attribute differs from the release's ranges -- a small generated file -- to map
  the loader's hard-coded ranges onto the file's own train/dev/test split; on the real file nothing
  changes), ``Supervised_Learning.train`` (to cap ``total_epochs`` when asked and to keep the fusion
  and the optimiser it builds, for the gradient and learning-rate checks) and
  ``Supervised_Learning.single_test`` (to keep the micro/macro F1 that ``test`` only prints);
* MultiBench's own prints are captured line by line: ``Epoch N train loss`` / ``valid loss ...
  f1_micro ... f1_macro`` / ``Saving Best`` give the per-epoch history.

Protocol (the only one): MultiBench's.  ``train`` saves the whole model whenever the validation macro
F1 improves (early stop after 8 epochs without improvement), the example reloads that checkpoint and
``test`` reports micro and macro F1 on the test split.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import re
import runpy
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from .. import multibench as adapter
from ..common import import_standins
from . import data as mmimdb
from ..common.run_context import patched_attrs as _patched_attrs, working_dir as _cwd, torch_threads as _threads, seed_everything

UPSTREAM_NAME = "multibench"
UPSTREAM_COMMIT = "49f9be224f342de005b7f001281f33df4301eb22"
EXAMPLE = "examples/multimedia/mmimdb_simple_late_fusion.py"
# The example's own settings at the pinned commit (read from the file; stated in reports).
UPSTREAM_HPARAMS = {"epochs": 1000, "early_stop_patience": 7, "batch_size": 128, "optimizer": "AdamW", "lr": 8e-3,
                    "weight_decay": 0.01, "clip_val": 8, "num_workers": 8}
# Top-level packages of the MultiBench repository (imported relative to its root).
UPSTREAM_PACKAGES = ("datasets", "unimodals", "fusions", "training_structures", "eval_scripts", "robustness",
                     "utils", "objective_functions", "special", "deprecated", "private_test_scripts")

_TRAIN = re.compile(r"^Epoch (\d+) train loss: (?:tensor\()?([-+0-9.eEnaifNIF]+)")
_VALID = re.compile(r"^Epoch (\d+) valid loss: (?:tensor\()?([-+0-9.eEnaifNIF]+).*? f1_micro: (\S+) f1_macro: (\S+)")
_INFO = re.compile(r"^(Training Time|Training Peak Mem|Training Params|Inference Time|Inference Params): (\S+)")


class UpstreamError(RuntimeError):
    """The MultiBench clone is missing or not patched; the message names the command that fixes it."""


def check_upstream(path: Optional[Path] = None) -> Path:
    """The patched clone: ``path``, else where ``./apply_patches.sh multibench`` puts it (one answer for both)."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    fix = (f"run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion apply {UPSTREAM_NAME}`) from the deqfusion "
           f"checkout, or pass --upstream / ${CLONES_ENV} (a folder holding {UPSTREAM_NAME}/) pointing at a clone of "
           f"pliang279/MultiBench at {UPSTREAM_COMMIT[:7]} with patches/{UPSTREAM_NAME}/*.patch applied")
    example = path / EXAMPLE
    if not example.is_file() or not (path / "training_structures" / "Supervised_Learning.py").is_file():
        raise UpstreamError(f"no MultiBench clone at {path} ({EXAMPLE} missing); {fix}")
    if "deq_adapter" not in example.read_text(encoding="utf-8", errors="replace"):
        raise UpstreamError(f"{example} is not patched for DEQ fusion; {fix}")
    return path


# ----------------------------------------------------------------------------------------------
# one run


@dataclass
class RunSpec:
    data: Path                          # multimodal_imdb.hdf5 (real, or generated with data.generate)
    seed: int = 0
    settings: adapter.Settings = field(default_factory=adapter.Settings)
    epochs: Optional[int] = None        # cap on train()'s total_epochs (None: the example's 1000 + early stop)
    batch_size: Optional[int] = None    # None: the example's 128
    num_workers: Optional[int] = None   # None: get_dataloader's 8 worker processes
    device: str = "auto"
    threads: Optional[int] = None

    def label(self) -> str:
        return self.settings.describe()


@dataclass
class RunResult:
    fusion: str
    ablation: str
    seed: int
    generated: bool
    epochs_trained: int
    best_epoch: Optional[int]
    wall_s: float
    metrics: Dict[str, float]                 # test micro / macro F1 in % (MultiBench's protocol)
    history: List[Dict[str, Any]]             # per epoch: train_loss, valid_loss, f1_micro, f1_macro (in %), saved
    train_process_runs: int                   # >1 when memory_profiler re-ran a very short training (MultiBench quirk)
    param_groups: List[Dict[str, Any]]        # of the optimiser train() built: name, lr, weight_decay, parameters
    fusion_grad: Dict[str, Any]               # after training: parameters with a gradient, total norm
    fusion_phases: List[Dict[str, Any]]       # DEQ solver statistics per train / validation phase
    fusion_test: Dict[str, Any]               # DEQ solver statistics of the test pass
    complexity: Dict[str, str]                # MultiBench's Training Time / Peak Mem / Params prints
    splits: Dict[str, List[int]]              # the file's train/dev/test ranges the loader read
    settings: Dict[str, Any]
    upstream_log: str = ""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


class _LineTap(io.TextIOBase):
    """A stdout that keeps every line, hands each to ``on_line`` and optionally echoes it."""

    def __init__(self, on_line: Callable[[str], None], echo: bool):
        self.on_line, self.echo = on_line, echo
        self.lines: List[str] = []
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.lines.append(line)
            self.on_line(line)
        if self.echo:
            sys.__stdout__.write(text)
        return len(text)

    def getvalue(self) -> str:
        return "\n".join(self.lines + ([self._buf] if self._buf else []))


def parse_line(line: str) -> Optional[tuple]:
    """One line of MultiBench's output: ("train", epoch, loss), ("valid", epoch, loss, f1_micro, f1_macro),
    ("saved",), ("info", key, value) or None.  Losses print as tensors (``tensor(0.69, grad_fn=...)``,
    on a GPU ``tensor(0.69, device='cuda:0')``)."""
    m = _TRAIN.match(line)
    if m:
        return ("train", int(m.group(1)), _number(m.group(2)))
    m = _VALID.match(line)
    if m:
        return ("valid", int(m.group(1)), _number(m.group(2)), _number(m.group(3)), _number(m.group(4)))
    if line.strip() == "Saving Best":
        return ("saved",)
    m = _INFO.match(line)
    if m:
        return ("info", m.group(1), m.group(2))
    return None


def _number(text: str) -> float:
    try:
        return float(text.rstrip(",)"))
    except ValueError:
        return float("nan")


@contextlib.contextmanager
def upstream_imports(clone: Path) -> Iterator[None]:
    """MultiBench's top-level packages import from ``clone`` inside the block; sys.path and any modules of
    the same names (e.g. HuggingFace ``datasets``) are as before afterwards."""
    def ours(name: str) -> bool:
        return name.partition(".")[0] in UPSTREAM_PACKAGES

    saved_modules = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved_modules:
        del sys.modules[k]
    saved_path = list(sys.path)
    sys.path.insert(0, str(clone))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)


def remapped_dataset(base: type, splits: Dict[str, Any]) -> type:
    """A subclass of get_data's IMDBDataset that reads the file's own split where the loader asks for one of
    the release's fixed ranges (train 0-15552, dev 15552-18160, test 18160-25959)."""
    by_range = {tuple(mmimdb.UPSTREAM_SPLITS[k]): tuple(splits[k]) for k in mmimdb.UPSTREAM_SPLITS}

    class IMDBDatasetOwnSplit(base):  # type: ignore[misc, valid-type]
        def __init__(self, file, start_ind, end_ind, *args, **kwargs):
            start_ind, end_ind = by_range.get((start_ind, end_ind), (start_ind, end_ind))
            super().__init__(file, start_ind, end_ind, *args, **kwargs)

    IMDBDatasetOwnSplit.__qualname__ = f"{base.__qualname__}OwnSplit"
    return IMDBDatasetOwnSplit


def _fork_workers(loaders: Any) -> Any:
    """DataLoader workers fork, as in a plain run of the example on Linux, also inside a spawned run_pool
    worker (whose default start method is spawn): a spawned DataLoader worker would re-import get_data.py
    without the import stand-ins, and could not unpickle the split-mapping dataset class."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return loaders
    for loader in loaders if isinstance(loaders, (tuple, list)) else (loaders,):
        if getattr(loader, "num_workers", 0) > 0 and loader.multiprocessing_context is None:
            loader.multiprocessing_context = "fork"
    return loaders


class _OptimizerRecorder:
    """Wraps train()'s ``optimtype`` to keep the optimiser it builds (for the learning-rate check)."""

    def __init__(self, optimtype: Any):
        self.optimtype = optimtype
        self.built: List[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        opt = self.optimtype(*args, **kwargs)
        self.built.append(opt)
        return opt


def _param_groups(opt: Any) -> List[Dict[str, Any]]:
    return [{"name": g.get("name", f"group {i}"), "lr": float(g["lr"]), "weight_decay": float(g.get("weight_decay", 0)),
             "parameters": int(sum(p.numel() for p in g["params"]))} for i, g in enumerate(opt.param_groups)]


def _grad_summary(module: Any) -> Dict[str, Any]:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    norm = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads)) if grads else 0.0
    return {"parameters": len(params), "with_grad": len(grads), "nonzero": sum(int(bool(g.abs().sum() > 0)) for g in grads),
            "grad_norm": norm, "finite": all(bool(g.isfinite().all()) for g in grads)}


def run(spec: RunSpec, upstream_dir: Optional[Path] = None, *, workdir: Optional[Path] = None,
        on_epoch: Optional[Callable[[int], None]] = None, echo: bool = False) -> RunResult:
    """Execute the patched example once and return its test metrics, history and fusion statistics."""
    import torch

    from ..common.cuda_shim import cuda_redirect, resolve_device

    clone = check_upstream(upstream_dir).resolve()
    info = mmimdb.check_file(Path(spec.data))
    device = resolve_device(spec.device)
    if spec.epochs is not None and spec.epochs < 1:
        raise ValueError("epochs must be >= 1")
    settings = replace(spec.settings, data=str(Path(spec.data).resolve()))
    state: Dict[str, Any] = {"history": [], "runs": 0, "test": [], "complexity": {}, "fusion": None, "opt": None}

    def on_line(line: str) -> None:
        parsed = parse_line(line)
        if parsed is None:
            return
        kind, history = parsed[0], state["history"]
        if kind == "train":
            if parsed[1] == 0:  # a (re)start of train()'s loop
                state["runs"] += 1
                state["history"] = history = []
            history.append({"epoch": parsed[1], "train_loss": parsed[2], "saved": False})
        elif kind == "valid" and history:
            history[-1].update(valid_loss=parsed[2], f1_micro=100 * parsed[3], f1_macro=100 * parsed[4])
            if on_epoch is not None:
                on_epoch(parsed[1])
        elif kind == "saved" and history:
            history[-1]["saved"] = True
        elif kind == "info":
            state["complexity"][parsed[1]] = parsed[2]

    tap = _LineTap(on_line, echo)
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="multibench-")))
        work.mkdir(parents=True, exist_ok=True)
        stack.enter_context(import_standins.stand_ins(adapter.STANDINS))
        stack.enter_context(upstream_imports(clone))
        stack.enter_context(mmimdb.own_splits())
        stack.enter_context(adapter.configure(settings))
        stack.enter_context(_threads(spec.threads))
        if device.type != "cuda":
            stack.enter_context(cuda_redirect(device))
        gd = importlib.import_module("datasets.imdb.get_data")
        sl = importlib.import_module("training_structures.Supervised_Learning")
        orig_loader, orig_train, orig_single_test = gd.get_dataloader, sl.train, sl.single_test
        loader_sig = inspect.signature(orig_loader)

        def get_dataloader(*args: Any, **kwargs: Any) -> Any:
            bound = loader_sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if spec.num_workers is not None:
                bound.arguments["num_workers"] = spec.num_workers
            if spec.batch_size is not None:
                bound.arguments["batch_size"] = spec.batch_size
            state["loader_args"] = {k: v for k, v in bound.arguments.items() if k not in ("path", "test_path")}
            if info.upstream_layout:
                loaders = orig_loader(*bound.args, **bound.kwargs)
            else:
                with _patched_attrs(gd, IMDBDataset=remapped_dataset(gd.IMDBDataset, info.splits)):
                    loaders = orig_loader(*bound.args, **bound.kwargs)
            return _fork_workers(loaders)

        def train(encoders, fusion, head, train_dataloader, valid_dataloader, total_epochs, *args, **kwargs):
            state["fusion"] = fusion
            if spec.epochs is not None:
                total_epochs = spec.epochs
            recorder = _OptimizerRecorder(kwargs.get("optimtype", torch.optim.RMSprop))
            kwargs["optimtype"] = recorder
            state["opt"] = recorder
            return orig_train(encoders, fusion, head, train_dataloader, valid_dataloader, total_epochs, *args, **kwargs)

        def single_test(model, *args, **kwargs):
            result = orig_single_test(model, *args, **kwargs)
            flush = getattr(model.fuse, "flush_stats", None)
            state["test"].append({"metrics": dict(result), "fusion": (flush() or {}) if flush else {}})
            return result

        stack.enter_context(_patched_attrs(gd, get_dataloader=get_dataloader))
        stack.enter_context(_patched_attrs(sl, train=train, single_test=single_test))
        stack.enter_context(_cwd(work))
        stack.enter_context(contextlib.redirect_stdout(tap))
        seed_everything(spec.seed)
        t0 = time.perf_counter()
        # not run as "__main__": memory_profiler starts a process, and a spawned one (in a run_pool worker)
        # re-imports the parent's __main__, which must not be the example
        runpy.run_path(str(clone / EXAMPLE), run_name="__multibench_example__")
        wall = time.perf_counter() - t0
        fusion = state["fusion"]
        if getattr(fusion, "flush_stats", None) is not None:
            fusion.flush_stats()  # the trained module's last validation phase, into the captured log

    if not state["test"]:
        raise RuntimeError(f"the example finished without a test evaluation; its output:\n{tap.getvalue()[-3000:]}")
    history = state["history"]
    saved = [h["epoch"] for h in history if h.get("saved")]
    test = state["test"][0]
    opt = state["opt"].built[-1] if state["opt"] is not None and state["opt"].built else None
    return RunResult(
        fusion=spec.settings.fusion, ablation=spec.settings.ablation if spec.settings.is_deq else "concat",
        seed=spec.seed, generated=info.generated, epochs_trained=len(history), best_epoch=saved[-1] if saved else None,
        wall_s=wall, metrics={"micro": 100 * float(test["metrics"]["micro"]), "macro": 100 * float(test["metrics"]["macro"])},
        history=history, train_process_runs=state["runs"], param_groups=_param_groups(opt) if opt is not None else [],
        fusion_grad=_grad_summary(fusion) if fusion is not None else {},
        fusion_phases=list(getattr(fusion, "phase_log", [])), fusion_test=test["fusion"],
        complexity=dict(state["complexity"]), splits={k: list(v) for k, v in info.splits.items()},
        settings={"describe": spec.settings.describe(), **{k: v for k, v in settings.to_json().items()},
                  "fusion_kwargs": spec.settings.fusion_kwargs() if spec.settings.is_deq else {},
                  "lr": adapter.lr(UPSTREAM_HPARAMS["lr"], spec.settings), "device": str(device),
                  "threads": spec.threads or torch.get_num_threads(), "loader": state.get("loader_args", {}),
                  "epochs_cap": spec.epochs},
        upstream_log=tap.getvalue(),
    )


@dataclass(frozen=True)
class Task:
    """One training run for the run pool."""

    spec: RunSpec
    upstream: Optional[Path] = None


def execute(task: Task, on_epoch: Optional[Callable[[int], None]] = None) -> RunResult:
    """The pool's worker: one run of the patched example."""
    return run(task.spec, task.upstream, on_epoch=on_epoch)
