"""Drive CM-BERT's own ``run_classifier.main`` (training loop, dev-loss model selection, test metrics) unchanged.

One call to :func:`run` is one call of the upstream's ``main(i)``: one seed, one fusion setting.
``run_classifier.py`` is imported from the patched clone and not edited; what it hard-codes
against a normal machine is handled here, at run time, for the duration of the call:

* **paths**: every default path (``--data_dir``, ``--bert_model``, ``--output_dir``), the audio
  pickle and the best-checkpoint reload are relative to the parent of a folder named
  ``Cross-Modal-BERT-master``.  The runner lays out ``<work>/Cross-Modal-BERT-master/`` --
  ``data/text/*.tsv`` (links to the clone's real CMU-MOSI text, or its first rows), ``data/audio/
  MOSI_cmu_audio_CLS.pickle`` (the real pickle, or a generated one), ``pre-trained BERT`` (a link to
  the BERT folder) -- and runs with ``<work>`` as the working directory;
* **output folder**: ``main`` refuses a non-empty ``CM-BERT_output``; each run gets a fresh ``<work>``;
* **CUDA_VISIBLE_DEVICES**: the module sets it to ``"1"`` when imported (hiding the only GPU of a
  one-GPU machine); the runner puts the caller's value back right after the import, before CUDA
  is initialised;
* **n_gpu = 2**: ``main`` always wraps the model in ``torch.nn.DataParallel``.  Unless
  ``data_parallel=True``, ``torch.nn.DataParallel`` is, during the call, a one-device wrapper with
  the same ``.module`` (parameter names keep their ``module.`` prefix, the checkpoint is saved from
  ``.module`` as upstream), so the fusion's solver statistics are those of the model itself;
* **seed**: ``main`` ignores ``--seed`` and draws ``np.random.randint(1, 10000)``; the runner seeds
  numpy's global generator with the run's seed just before, so the drawn seed (recorded as
  ``upstream_seed``) and the whole run are reproducible;
* **optimiser**: BertAdam's scalar-first ``add_`` / ``addcmul_`` calls go through
  :func:`deqfusion.adapters.common.torch_compat.legacy_scalar_overloads`;
* **device**: ``--no_cuda`` on CPU (the upstream itself picks CUDA when available).

What the runner adds is observation only: a proxy for ``BertForSequenceClassification.from_pretrained``
(the name in run_classifier's globals) records the two models ``main`` builds (the trained one and
the test-time reload of the best checkpoint), hooks on the fusion's parameters record that their
gradients arrive and are finite, a forward hook on the DEQ fusion writes its solver statistics to
the log, and the upstream's ``logging`` output is captured (its ``***** test results *****`` lines:
acc = Acc-2, F1, mae, corr, acc7).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .. import cmbert as adapter
from ..common.report import GENERATED
from . import data as mosi
from ..common.run_context import patched_attrs as _patched_attrs, working_dir as _cwd, argv as _argv, torch_threads as _threads

UPSTREAM_NAME = "cmbert"
UPSTREAM_COMMIT = "3e44dce6b00431f88f8d5de12bef9706116fa97b"
FOLDER = "Cross-Modal-BERT-master"   # the folder name run_classifier.py's paths are relative to
BERT_LINK = "pre-trained BERT"
# run_classifier.py's argparse defaults at the pin (stated for reports; the runner passes only what it changes)
UPSTREAM_HPARAMS = {"max_seq_length": 50, "train_batch_size": 24, "eval_batch_size": 24, "test_batch_size": 24,
                    "learning_rate": 2e-5, "fusion_group_lr": 0.01, "num_train_epochs": 3.0, "warmup_proportion": 0.1,
                    "runs": 5}
METRIC_KEYS = ("acc7", "acc", "F1", "mae", "corr")   # main()'s result keys: Acc-7, Acc-2, F1, MAE, Corr
LOG = logging.getLogger("deqfusion.cmbert")


class UpstreamError(RuntimeError):
    """The CM-BERT clone is missing or not patched; the message names the command that fixes it."""


def check_upstream(path: Optional[Path] = None) -> Path:
    """The patched clone: ``path``, else where ``./apply_patches.sh cmbert`` puts it (one answer for both)."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    fix = (f"run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion apply {UPSTREAM_NAME}`) from the deqfusion checkout, "
           f"or pass --upstream / ${CLONES_ENV} (a folder holding {UPSTREAM_NAME}/) pointing at a clone of "
           f"thuiar/Cross-Modal-BERT at {UPSTREAM_COMMIT[:7]} with patches/{UPSTREAM_NAME}/*.patch applied")
    for name in ("model.py", "run_classifier.py", "utils.py"):
        if not (path / name).is_file():
            raise UpstreamError(f"no CM-BERT clone at {path} ({name} missing); {fix}")
    if "deq_adapter" not in (path / "model.py").read_text(encoding="utf-8", errors="replace"):
        raise UpstreamError(f"{path}/model.py is not patched for DEQ fusion; {fix}")
    return path


_MODULE_NAMES = ("run_classifier", "model", "utils")
_loaded: Dict[Path, Any] = {}


def load_upstream(path: Optional[Path] = None) -> Any:
    """Import the clone's ``run_classifier`` (with its ``model`` and ``utils``), cached per clone.

    The modules have generic names, so they are imported with the clone first on sys.path and
    whatever ``model`` / ``utils`` / ``run_classifier`` were in sys.modules before are put back.
    The module sets ``CUDA_VISIBLE_DEVICES="1"`` at import; the caller's value is restored.
    """
    path = check_upstream(path).resolve()
    if path in _loaded:
        return _loaded[path]
    saved = {name: sys.modules.pop(name) for name in _MODULE_NAMES if name in sys.modules}
    cuda_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    mpl_env = os.environ.get("MPLBACKEND")
    os.environ.setdefault("MPLBACKEND", "Agg")  # run_classifier imports matplotlib.pyplot; no display needed
    sys.path.insert(0, str(path))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # model.py prints an apex hint at import
            import run_classifier as rc  # noqa: PLC0415 - the clone's module
    finally:
        sys.path.remove(str(path))
        for name in _MODULE_NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        _restore_env("CUDA_VISIBLE_DEVICES", cuda_env)
        _restore_env("MPLBACKEND", mpl_env)
    if printed.getvalue().strip():
        LOG.debug("run_classifier import printed: %s", printed.getvalue().strip())
    _loaded[path] = rc
    return rc


def _restore_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# ----------------------------------------------------------------------------------------------
# one run


@dataclass
class RunSpec:
    bert_dir: Path                              # CM-BERT's BERT folder (bert_config.json, pytorch_model.bin, vocab.txt)
    seed: int = 0
    settings: adapter.Settings = field(default_factory=adapter.Settings)
    epochs: float = UPSTREAM_HPARAMS["num_train_epochs"]
    rows: Optional[Tuple[int, int, int]] = None  # first rows of train/dev/test (None: every row)
    max_seq_length: int = UPSTREAM_HPARAMS["max_seq_length"]
    batch_size: Optional[int] = None            # train/eval/test batch size (None: the upstream's 24)
    audio: Optional[Path] = None                # the real pickle (None: the clone's, else generated)
    generate_audio: bool = True                 # generate the pickle when no real one is found
    verify: bool = True                         # check the data's git-blob hashes
    device: str = "auto"
    threads: Optional[int] = None
    data_parallel: bool = False                 # keep the upstream's DataParallel over every visible GPU
    extra_args: Tuple[str, ...] = ()            # more run_classifier.py arguments (e.g. --learning_rate 3e-5)

    def label(self) -> str:
        return self.settings.describe()


@dataclass
class RunResult:
    seed: int
    upstream_seed: int                          # the seed main() drew (np.random.randint(1, 10000))
    fusion: str
    ablation: str
    metrics: Dict[str, float]                   # main()'s results: acc (Acc-2), F1, mae, corr, acc7, test_loss, loss
    dev_history: List[Dict[str, float]]         # per epoch: eval_loss, eval_accuracy, loss (the upstream's log)
    train_steps: int
    epochs_trained: int
    models_built: int                           # 2: the trained model and the test-time reload of the best checkpoint
    fusion_stats: Dict[str, Any]                # DEQ solves: last train / dev / test summaries, totals
    grad_stats: Dict[str, Any]                  # gradients that reached the fusion's parameters
    data: Dict[str, Any]                        # rows used, audio real or generated, BERT source
    settings: Dict[str, Any]
    wall_s: float
    upstream_log: str = ""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


class _OneDevice(torch.nn.Module):
    """Stands in for ``torch.nn.DataParallel`` during a run: the same ``.module``, no replication."""

    def __init__(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@contextlib.contextmanager
def _capture_logging(echo: bool, log_file: Optional[Path] = None) -> Iterator[io.StringIO]:
    """Root logging at INFO into a buffer in the upstream's format (utils.py's basicConfig), for the run;
    also, line by line, into ``log_file`` (so a run that fails leaves its log)."""
    buf = io.StringIO()
    fmt = logging.Formatter("%(asctime)s - %(levelname)s - %(name)s -   %(message)s", datefmt="%m/%d/%Y %H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(buf)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    if not echo:
        for h in old_handlers:
            root.removeHandler(h)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        for h in old_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(old_level)


def upstream_argv(spec: RunSpec, device_type: str) -> List[str]:
    """run_classifier.py's command line: only what differs from its defaults (paths stay the defaults)."""
    argv = ["run_classifier.py"]
    if spec.epochs != UPSTREAM_HPARAMS["num_train_epochs"]:
        argv += ["--num_train_epochs", repr(float(spec.epochs))]
    if spec.max_seq_length != UPSTREAM_HPARAMS["max_seq_length"]:
        argv += ["--max_seq_length", str(spec.max_seq_length)]
    if spec.batch_size is not None:
        for flag in ("--train_batch_size", "--eval_batch_size", "--test_batch_size"):
            argv += [flag, str(spec.batch_size)]
    if device_type == "cpu":
        argv.append("--no_cuda")
    return argv + list(spec.extra_args)


def prepare_workdir(spec: RunSpec, work: Path, clone: Path) -> Dict[str, Any]:
    """Lay out ``<work>/Cross-Modal-BERT-master/`` as run_classifier.py expects it; returns what data went in."""
    from .convert import check_folder, folder_source

    root = Path(work) / FOLDER
    text_src = mosi.check_text(clone / mosi.TEXT_DIR, verify=spec.verify)
    audio = mosi.locate_audio(clone, spec.audio, verify=spec.verify)
    if audio is None:
        if not spec.generate_audio:
            raise mosi.DataError(f"{clone / mosi.AUDIO_FILE} is missing (snapshots without files of 4 MiB or more lack "
                                 f"it); use a complete clone of thuiar/Cross-Modal-BERT, pass --audio, or allow a "
                                 f"generated stand-in")
        gen = mosi.generate_audio(Path(work) / "generated" / mosi.AUDIO_FILE.name, text_src)
        audio = mosi.Audio(gen, generated=True)
        LOG.warning("CMU-MOSI audio: %s is missing, so a generated pickle of its exact structure (a tuple of "
                    "(N, 50, 5) float64 arrays) is used: %s", mosi.AUDIO_FILE, GENERATED)
    counts = mosi.write_subset(text_src, audio.path, root / mosi.TEXT_DIR, root / mosi.AUDIO_FILE, spec.rows)
    bert = check_folder(spec.bert_dir).resolve()
    link = root / BERT_LINK
    if link.exists() or link.is_symlink():
        link.unlink()
    try:
        os.symlink(bert, link, target_is_directory=True)
    except OSError:  # no symlinks here: copy the three files
        import shutil

        shutil.copytree(bert, link)
    return {"rows": counts, "audio": str(audio.path), "audio_generated": audio.generated,
            "text": str(text_src), "bert": str(bert), "bert_source": folder_source(bert)}


_EVAL_RE = re.compile(r"^\S+ \S+ - INFO - utils -\s+(eval_loss|eval_accuracy|loss|global_step) = (\S+)\s*$")


def dev_history(log_text: str) -> List[Dict[str, float]]:
    """The upstream's per-epoch ``***** Eval results *****`` values, from its own log lines."""
    history: List[Dict[str, float]] = []
    current: Dict[str, float] = {}
    for line in log_text.splitlines():
        if "***** Eval results *****" in line:
            current = {}
            history.append(current)
            continue
        m = _EVAL_RE.match(line)
        if m and history and history[-1] is current:
            try:
                current[m.group(1)] = float(m.group(2))
            except ValueError:
                current[m.group(1)] = float("nan")
    return history


class _Observer:
    """What the runner watches: the models main() builds, the fusion's gradients and solves."""

    def __init__(self, log_every: int, on_step: Optional[Callable[[int], None]] = None):
        self.models: List[Any] = []
        self.on_step = on_step
        self.epochs_done = 0
        self.phase = "train"
        self.train_steps = 0
        self.log_every = max(1, log_every)
        self.grad = {"backward_passes": 0, "params": 0, "params_with_grad": 0, "all_finite": True,
                     "grad_norm_first": None, "grad_norm_last": None, "param_change": None}
        self.solves: Dict[str, Dict[str, Any]] = {}
        self._pending: Dict[int, float] = {}
        self._names: List[str] = []
        self._initial: Optional[List[Any]] = None

    # the proxy for BertForSequenceClassification in run_classifier's globals
    def proxy(self, cls: Any) -> Any:
        def from_pretrained(*args, **kwargs):
            model = cls.from_pretrained(*args, **kwargs)
            if model is None:  # the upstream logs and returns None when the folder cannot be read
                raise RuntimeError(f"CM-BERT could not load the BERT folder {args[0] if args else ''!r} (see the log)")
            self.models.append(model)
            self.phase = "train" if len(self.models) == 1 else "test"
            self._watch(model, first=len(self.models) == 1)
            return model
        return types.SimpleNamespace(from_pretrained=from_pretrained)

    def fusion_params(self, model: Any) -> List[Tuple[str, Any]]:
        fusion = adapter.model_fusion(model)
        if fusion is not None:
            return [(n, p) for n, p in fusion.named_parameters()]
        finetun = model.BertFinetun  # the sum: its three scalars are the fusion's parameters
        return [(n, getattr(finetun, n)) for n in ("text_weight_1", "audio_weight_1", "bias")]

    def _watch(self, model: Any, first: bool) -> None:
        fusion = adapter.model_fusion(model)
        if fusion is not None:
            fusion.register_forward_hook(self._after_fusion)
        if not first:
            return
        params = self.fusion_params(model)
        self._names = [n for n, _ in params]
        self._initial = [p.detach().clone() for _, p in params]
        self.grad["params"] = len(params)
        self._params = [p for _, p in params]
        for i, (_, p) in enumerate(params):
            p.register_hook(lambda g, i=i: self._on_grad(i, g))
        model.register_forward_pre_hook(self._before_model)

    def _before_model(self, module, args):
        if module.training:
            self.phase = "train"
            self.train_steps += 1
            if self.on_step is not None:
                self.on_step(self.train_steps)
        elif self.phase == "train":  # the upstream evaluates on dev after each epoch
            self.phase = "dev"
            self.epochs_done += 1
        self._flush()

    def _on_grad(self, i: int, grad: Any) -> None:
        self._pending[i] = float(grad.detach().double().norm())

    def _flush(self) -> None:
        """One backward pass ended (the next forward began): book the gradients it brought."""
        if not self._pending:
            return
        g = self.grad
        g["backward_passes"] += 1
        norms = list(self._pending.values())
        g["params_with_grad"] = max(g["params_with_grad"], sum(1 for v in norms if v > 0.0))
        g["all_finite"] = g["all_finite"] and all(math.isfinite(v) for v in norms)
        total = math.sqrt(sum(v * v for v in norms))
        if g["grad_norm_first"] is None:
            g["grad_norm_first"] = total
        g["grad_norm_last"] = total
        self._pending = {}

    def _after_fusion(self, module, inputs, output) -> None:
        summary = adapter.stats_summary(module)
        phase = "train" if module.training else ("test" if self.phase == "test" else "dev")
        agg = self.solves.setdefault(phase, {"forwards": 0, "samples": 0, "nstep_sum": 0.0, "nstep_max": 0,
                                             "status": {}, "rel_residual_max": 0.0, "jac_loss_last": None})
        agg["forwards"] += 1
        agg["samples"] += summary["samples"]
        agg["nstep_sum"] += summary["nstep_mean"] * summary["samples"]
        agg["nstep_max"] = max(agg["nstep_max"], summary["nstep_max"])
        agg["rel_residual_max"] = max(agg["rel_residual_max"], summary["rel_residual_max"])
        for k, v in summary["status"].items():
            agg["status"][k] = agg["status"].get(k, 0) + v
        if "jac_loss" in summary:
            agg["jac_loss_last"] = summary["jac_loss"]
        if phase != "train" or agg["forwards"] % self.log_every == 0 or agg["forwards"] == 1:
            status = ", ".join(f"{k} {v}" for k, v in summary["status"].items() if v)
            back = summary.get("backward")
            LOG.info("DEQ fusion [%s] forward %d: %d samples, solver steps mean %.1f max %d, %s, rel residual max %.2e%s%s",
                     phase, agg["forwards"], summary["samples"], summary["nstep_mean"], summary["nstep_max"], status,
                     summary["rel_residual_max"],
                     f", jac loss {summary['jac_loss']:.4g}" if "jac_loss" in summary else "",
                     f"; previous backward: steps max {back['nstep_max']}, rel residual max {back['rel_residual_max']:.2e}"
                     if back else "")

    def finish(self) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        self._flush()
        if self._initial is not None and self.models:
            changes = [float((p.detach() - p0).abs().max()) for p, p0 in zip(self._params, self._initial)]
            self.grad["param_change"] = max(changes) if changes else 0.0
            self.grad["param_names"] = self._names
        solves = {}
        for phase, agg in self.solves.items():
            a = dict(agg)
            a["nstep_mean"] = a.pop("nstep_sum") / a["samples"] if a["samples"] else 0.0
            solves[phase] = a
        return solves, dict(self.grad)


def run(spec: RunSpec, upstream_dir: Optional[Path] = None, *, workdir: Optional[Path] = None,
        echo: bool = False, log_every: int = 10, on_step: Optional[Callable[[int], None]] = None,
        log_file: Optional[Path] = None) -> RunResult:
    """One run of the upstream's ``run_classifier.main`` (training, dev-loss selection, test); labelled results.

    ``on_step`` is called after each training step begins (progress); ``log_file`` gets the log as it is written.
    """
    import numpy as np

    from ..common.cuda_shim import resolve_device
    from ..common.torch_compat import legacy_scalar_overloads

    clone = check_upstream(upstream_dir).resolve()
    rc = load_upstream(clone)
    device = resolve_device(spec.device)
    if spec.epochs < 1:
        raise ValueError(f"epochs must be >= 1 (run_classifier trains int(num_train_epochs) epochs), got {spec.epochs}")
    settings = spec.settings
    if settings.seq_len != spec.max_seq_length:
        from dataclasses import replace

        settings = replace(settings, seq_len=spec.max_seq_length)
    observer = _Observer(log_every, on_step)
    argv = upstream_argv(spec, device.type)

    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cmbert-")))
        work.mkdir(parents=True, exist_ok=True)
        if (work / FOLDER / "CM-BERT_output").exists():
            raise ValueError(f"{work / FOLDER / 'CM-BERT_output'} exists: run_classifier.main needs a fresh output folder")
        buf = stack.enter_context(_capture_logging(echo, log_file))
        data_info = prepare_workdir(spec, work, clone)
        stack.enter_context(_patched_attrs(rc, BertForSequenceClassification=observer.proxy(rc.BertForSequenceClassification)))
        if not spec.data_parallel:
            stack.enter_context(_patched_attrs(torch.nn, DataParallel=_OneDevice))
        stack.enter_context(legacy_scalar_overloads())
        stack.enter_context(adapter.configure(settings))
        stack.enter_context(_threads(spec.threads))
        stack.enter_context(_cwd(work))
        stack.enter_context(_argv(argv))
        if not echo:
            out = io.StringIO()
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
        LOG.info("deqfusion runner: %s; seed %d; run_classifier.py %s; data %s", settings.describe(), spec.seed,
                 " ".join(argv[1:]) or "(defaults)", data_info["rows"])
        np.random.seed(spec.seed)
        upstream_seed = int(np.random.RandomState(spec.seed).randint(1, 10000))
        t0 = time.perf_counter()
        results = rc.main(spec.seed)
        wall = time.perf_counter() - t0
        solves, grads = observer.finish()
        log_text = buf.getvalue()

    metrics = {k: float(v) for k, v in results.items() if v is not None}  # numpy scalars included
    return RunResult(
        seed=spec.seed, upstream_seed=upstream_seed, fusion=settings.fusion,
        ablation=settings.ablation if settings.is_deq else "sum", metrics=metrics,
        dev_history=dev_history(log_text), train_steps=observer.train_steps, epochs_trained=observer.epochs_done,
        models_built=len(observer.models),
        fusion_stats=solves, grad_stats=grads, data=data_info,
        settings={"fusion": settings.fusion, "ablation": settings.ablation, "jac_weight": settings.jac_weight,
                  "seq_len": settings.seq_len, "options": dict(settings.fusion_kwargs()) if settings.is_deq else {},
                  "argv": argv[1:], "device": str(device), "threads": spec.threads or torch.get_num_threads(),
                  "data_parallel": spec.data_parallel},
        wall_s=wall, upstream_log=log_text)


def train_steps(rows: int, batch_size: Optional[int], epochs: float) -> int:
    """Training steps run_classifier makes: ceil(rows / batch) per epoch, int(num_train_epochs) epochs."""
    batch = batch_size or UPSTREAM_HPARAMS["train_batch_size"]
    return -(-int(rows) // int(batch)) * int(epochs)


@dataclass(frozen=True)
class Task:
    """One training run for the run pool; ``log_file`` receives the upstream's log while it runs."""

    spec: RunSpec
    upstream: Optional[Path] = None
    log_file: Optional[Path] = None


def execute(task: Task, on_step: Optional[Callable[[int], None]] = None) -> RunResult:
    """The run pool's worker: one run, ``on_step`` called at each training step (the pool's progress tick)."""
    return run(task.spec, task.upstream, on_step=on_step, log_file=task.log_file)
