"""Drive MM-Dynamics' own training loop (``train_test.train``) on a patched clone, unchanged.

One call to :func:`run` is one training run: one dataset, one seed, one fusion setting.  The
upstream's ``train(data_folder, modelpath, testonly)`` is called as it is; the runner only

* imports the clone's ``model`` / ``train_test`` modules (``third_party/mmdynamics`` by default),
* lays out a working folder: ``<work>/<DATASET>/`` holds per-file links to the verified data (or,
  for the honest protocol, a carved split), the checkpoint goes to ``<work>/model/``, and the
  upstream runs with ``<work>`` as its current directory (it writes ``model/<DATASET>/checkpoint.pt``),
* seeds ``random``, ``numpy`` and ``torch`` (the upstream sets no seed),
* selects the fusion through :func:`deqfusion.adapters.mmdynamics.configure`,
* wraps, for the duration of the call, three functions of the ``train_test`` module (the file is
  untouched): ``prepare_trte_data`` (to keep the loaded tensors and, for ``modalities``, to keep
  only the chosen views), ``train_epoch`` (to count epochs, stop after ``epochs`` if asked, and
  record the fusion's solver statistics) and ``test_epoch`` (to compute metrics from the
  probabilities the upstream computes every 50 epochs),
* on a machine without CUDA, runs the upstream inside :func:`deqfusion.adapters.common.cuda_shim.cuda_redirect`.

Protocols (every reported number carries one of these labels):

``upstream``     MM-Dynamics' protocol: train on the whole training split, report the *final* model on
                 the test split (the upstream evaluates on test every 50 epochs only to print it).
``test-best``    the same runs, but the best of the every-50-epoch test evaluations (by acc + weighted F1
                 + macro F1), which is how the authors' DEQ release picked its BRCA checkpoint.  It
                 selects on the test set, so it is optimistic; it is shown only to compare with the paper.
``val``          honest model selection: a stratified validation split (``val_fraction`` of the training
                 split, drawn from the seed) is carved out and the model trains on the rest; the
                 checkpoint (every 50 epochs) with the best validation acc + weighted F1 + macro F1
                 (ties: lower validation cross-entropy, then the later epoch) is reported on the test split.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import mmdynamics as adapter
from ..common import report
from ..common.cuda_shim import cuda_redirect, resolve_device
from . import data as mogonet_data
from ..common.run_context import patched_attrs as _patched_attrs, working_dir as _cwd, torch_threads as _threads, seed_everything

UPSTREAM_NAME = "mmdynamics"
UPSTREAM_COMMIT = "7f04084daa81ef6223902677ad9ddafc8797b3d2"
PROTOCOLS = ("upstream", "val")
REPORT_PROTOCOLS = ("upstream", "test-best", "val")
EVAL_INTERVAL = 50  # train_test.py's test_inverval at the pinned commit
# train_test.train's hyper-parameters at the pinned commit (read from the file, stated for reports)
UPSTREAM_HPARAMS = {
    "BRCA": {"hidden": 500, "epochs": 2500, "lr": 1e-4, "step_size": 500},
    "ROSMAP": {"hidden": 300, "epochs": 1000, "lr": 1e-4, "step_size": 500},
}


class UpstreamError(RuntimeError):
    """The MM-Dynamics clone is missing or not patched; the message names the command that fixes it."""


class _StopTraining(Exception):
    pass


def check_upstream(path: Optional[Path] = None) -> Path:
    """The patched clone: ``path``, else where ``./apply_patches.sh mmdynamics`` puts it (one answer for both)."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    fix = (f"run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion apply {UPSTREAM_NAME}`) from the deqfusion "
           f"checkout, or pass --upstream / ${CLONES_ENV} (a folder holding {UPSTREAM_NAME}/) pointing at a clone "
           f"of TencentAILabHealthcare/mmdynamics at {UPSTREAM_COMMIT[:7]} with patches/{UPSTREAM_NAME}/*.patch applied")
    for name in ("model.py", "train_test.py"):
        if not (path / name).is_file():
            raise UpstreamError(f"no MM-Dynamics clone at {path} ({name} missing); {fix}")
    if "deq_adapter" not in (path / "model.py").read_text(encoding="utf-8", errors="replace"):
        raise UpstreamError(f"{path}/model.py is not patched for DEQ fusion; {fix}")
    return path


_MODULE_NAMES = ("model", "train_test")
_loaded: Dict[Path, Tuple[Any, Any]] = {}


def load_upstream(path: Optional[Path] = None) -> Tuple[Any, Any]:
    """Import the clone's ``model`` and ``train_test`` modules (cached per clone).

    The upstream's modules have generic names, so they are imported with the clone first on
    sys.path and whatever ``model`` / ``train_test`` were in sys.modules before are put back.
    """
    path = check_upstream(path).resolve()
    if path in _loaded:
        return _loaded[path]
    saved = {name: sys.modules.pop(name) for name in _MODULE_NAMES if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        import model as model_mod  # noqa: PLC0415 - the clone's module
        import train_test as train_test_mod  # noqa: PLC0415
    finally:
        sys.path.remove(str(path))
        for name in _MODULE_NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    _loaded[path] = (model_mod, train_test_mod)
    return model_mod, train_test_mod


# ----------------------------------------------------------------------------------------------
# metrics


def metrics_from_probs(labels: np.ndarray, probs: np.ndarray) -> Dict[str, float]:
    """The upstream's metrics (in %), computed from its softmax probabilities, plus cross-entropy."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = probs.argmax(1)
    out = {
        "acc": 100.0 * accuracy_score(labels, pred),
        "f1_weighted": 100.0 * f1_score(labels, pred, average="weighted"),
        "f1_macro": 100.0 * f1_score(labels, pred, average="macro"),
    }
    if probs.shape[1] == 2:
        out["f1"] = 100.0 * f1_score(labels, pred)
        out["auc"] = 100.0 * roc_auc_score(labels, probs[:, 1]) if len(set(labels.tolist())) == 2 else float("nan")
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    out["nll"] = float(-np.log(p).mean())
    return out


def selection_score(m: Dict[str, float]) -> float:
    """acc + weighted F1 + macro F1: the authors' checkpoint criterion."""
    return m["acc"] + m["f1_weighted"] + m["f1_macro"]


# ----------------------------------------------------------------------------------------------
# one run


@dataclass
class RunSpec:
    dataset: str                       # "ROSMAP" or "BRCA"
    data_dir: Path                     # a verified MOGONET dataset folder
    seed: int = 0
    settings: adapter.Settings = field(default_factory=adapter.Settings)
    protocol: str = "upstream"         # "upstream" or "val"
    val_fraction: float = 0.2
    modalities: Optional[Tuple[int, ...]] = None   # 0-based view indices; None = all views
    epochs: Optional[int] = None       # stop after this many epochs (None: the upstream's own count)
    device: str = "auto"
    threads: Optional[int] = None
    keep_model: bool = False           # keep the trained model in the result (convergence analysis)

    def label(self) -> str:
        return self.settings.describe()


@dataclass
class RunResult:
    dataset: str
    seed: int
    fusion: str
    ablation: str
    protocol: str
    modalities: Optional[List[int]]
    epochs_trained: int
    wall_s: float
    metrics: Dict[str, Dict[str, Any]]     # report protocol -> metrics on the test split (+ "epoch")
    history: List[Dict[str, Any]]          # every evaluation: epoch, test (and val) metrics, fusion stats
    fusion_stats: Dict[str, Any]           # last training / evaluation solve
    settings: Dict[str, Any]
    upstream_log: str = ""
    cpu_s: float = 0.0                     # CPU time of the training call (its own process; robust to load)
    model: Any = None                      # the trained model when RunSpec.keep_model
    test_inputs: Any = None                # the upstream's normalised test tensors when keep_model
    traces: Any = None                     # name -> (samples, steps) residuals, see run_traces

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        for key in ("model", "test_inputs", "traces"):
            d.pop(key)
        return d


def stratified_val_split(labels: Sequence[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train indices, val indices), per class a ``fraction`` share (at least 1) drawn with ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    val: List[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        val.extend(rng.permutation(idx)[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:  # no symlinks (e.g. Windows without privileges)
        import shutil

        shutil.copyfile(src, dst)


def _write_rows(path: Path, rows: Sequence[str]) -> None:
    path.write_text("\n".join(rows) + "\n", encoding="ascii")


def prepare_workdir(spec: RunSpec, work: Path) -> Tuple[Path, int]:
    """Lay out <work>/<DATASET>/ for the upstream; returns (folder, number of validation rows first in *_te)."""
    ds = mogonet_data.spec(spec.dataset)
    folder = work / ds.name
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(spec.data_dir)
    if spec.protocol == "upstream":
        for file in ds.files:
            _link_or_copy((src / file).resolve(), folder / file)
        return folder, 0
    if spec.protocol != "val":
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {spec.protocol!r}")
    labels_tr = mogonet_data.read_rows(src / "labels_tr.csv")
    tr, va = stratified_val_split([int(float(x)) for x in labels_tr], spec.val_fraction, spec.seed)
    for stem in [str(v) for v in range(1, len(ds.view_dims) + 1)] + ["labels"]:
        rows_tr = mogonet_data.read_rows(src / f"{stem}_tr.csv")
        rows_te = mogonet_data.read_rows(src / f"{stem}_te.csv")
        _write_rows(folder / f"{stem}_tr.csv", [rows_tr[i] for i in tr])
        # validation rows first, then the real test rows: one upstream evaluation scores both
        _write_rows(folder / f"{stem}_te.csv", [rows_tr[i] for i in va] + rows_te)
    return folder, len(va)


def run(
    spec: RunSpec,
    upstream_dir: Optional[Path] = None,
    *,
    workdir: Optional[Path] = None,
    on_epoch: Optional[Callable[[int], None]] = None,
    echo: bool = False,
) -> RunResult:
    """Train once through the upstream's ``train_test.train`` and return labelled test metrics."""
    _, tt = load_upstream(upstream_dir)
    ds = mogonet_data.spec(spec.dataset)
    device = resolve_device(spec.device)
    if spec.modalities is not None:
        bad = [m for m in spec.modalities if not 0 <= m < len(ds.view_dims)]
        if bad or len(set(spec.modalities)) != len(spec.modalities) or not spec.modalities:
            raise ValueError(f"modalities must be distinct view indices in 0..{len(ds.view_dims) - 1}, got {spec.modalities}")
    if spec.epochs is not None and spec.epochs < 1:
        raise ValueError("epochs must be >= 1")

    orig_prepare, orig_train_epoch, orig_test_epoch = tt.prepare_trte_data, tt.train_epoch, tt.test_epoch
    state: Dict[str, Any] = {"epoch": -1, "model": None, "data": None, "train_stats": {}}
    history: List[Dict[str, Any]] = []

    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmd-")))
        folder, n_val = prepare_workdir(spec, work)
        labels_te_all = np.asarray(mogonet_data.read_labels(folder / "labels_te.csv"))

        def score(probs: np.ndarray, epoch: int) -> Dict[str, Any]:
            entry: Dict[str, Any] = {"epoch": epoch, "test": metrics_from_probs(labels_te_all[n_val:], probs[n_val:])}
            if n_val:
                entry["val"] = metrics_from_probs(labels_te_all[:n_val], probs[:n_val])
            fusion = adapter.model_fusion(state["model"]) if state["model"] is not None else None
            if fusion is not None:
                entry["fusion_eval"] = adapter.stats_summary(fusion)
                entry["fusion_train"] = state["train_stats"]
            return entry

        def prepare_trte_data(data_folder):
            tr, te, idx, labels = orig_prepare(data_folder)
            if spec.modalities is not None:
                tr = [tr[i] for i in spec.modalities]
                te = [te[i] for i in spec.modalities]
            state["data"] = (tr, te)
            return tr, te, idx, labels

        def train_epoch(data_list, label, model, optimizer):
            state["model"] = model
            state["epoch"] += 1
            orig_train_epoch(data_list, label, model, optimizer)
            state["train_stats"] = adapter.stats_summary(adapter.model_fusion(model))
            totals = state.setdefault("totals", {"epochs": 0, "f_evals": 0, "adjoint_evals": 0})
            totals["epochs"] += 1
            totals["f_evals"] += state["train_stats"].get("f_evals", 0)
            totals["adjoint_evals"] += state["train_stats"].get("backward", {}).get("f_evals", 0)
            if on_epoch is not None:
                on_epoch(state["epoch"])
            if spec.epochs is not None and state["epoch"] + 1 >= spec.epochs:
                raise _StopTraining

        def test_epoch(data_list, model):
            probs = orig_test_epoch(data_list, model)
            history.append(score(probs, state["epoch"]))
            return probs

        log = io.StringIO()
        stack.enter_context(_patched_attrs(tt, prepare_trte_data=prepare_trte_data, train_epoch=train_epoch,
                                           test_epoch=test_epoch))
        stack.enter_context(adapter.configure(spec.settings))
        stack.enter_context(_threads(spec.threads))
        if device.type != "cuda":
            stack.enter_context(cuda_redirect(device))
        stack.enter_context(_cwd(work))
        if not echo:
            stack.enter_context(contextlib.redirect_stdout(log))
        seed_everything(spec.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            tt.train(ds.name, "model", False)
        except _StopTraining:
            pass
        if not history or history[-1]["epoch"] != state["epoch"]:  # stopped early: score the final model
            probs = orig_test_epoch(state["data"][1], state["model"])
            history.append(score(probs, state["epoch"]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    model = state["model"]
    final = history[-1]
    metrics: Dict[str, Dict[str, Any]] = {}
    if spec.protocol == "upstream":
        metrics["upstream"] = dict(final["test"], epoch=final["epoch"])
        best = max(history, key=lambda h: (selection_score(h["test"]), h["epoch"]))
        metrics["test-best"] = dict(best["test"], epoch=best["epoch"])
    else:
        best = max(history, key=lambda h: (selection_score(h["val"]), -h["val"]["nll"], h["epoch"]))
        metrics["val"] = dict(best["test"], epoch=best["epoch"], val=best["val"])
        metrics["val-final"] = dict(final["test"], epoch=final["epoch"])
    fusion = adapter.model_fusion(model)
    result = RunResult(
        dataset=ds.name, seed=spec.seed, fusion=spec.settings.fusion,
        ablation=spec.settings.ablation if spec.settings.fusion == "deq" else "concat",
        protocol=spec.protocol, modalities=list(spec.modalities) if spec.modalities is not None else None,
        epochs_trained=state["epoch"] + 1, wall_s=wall, cpu_s=cpu, metrics=metrics, history=history,
        fusion_stats=({"train": state["train_stats"], "eval": adapter.stats_summary(fusion),
                       "per_epoch": _per_epoch(state.get("totals"))} if fusion is not None else {}),
        settings={"fusion": spec.settings.fusion, "ablation": spec.settings.ablation,
                  "jac_weight": spec.settings.jac_weight, "options": dict(spec.settings.fusion_kwargs()),
                  "device": str(device), "threads": spec.threads or torch.get_num_threads(),
                  "val_fraction": spec.val_fraction if spec.protocol == "val" else None},
        upstream_log=log.getvalue(),
    )
    if spec.keep_model:
        result.model = model
        result.test_inputs = [t[n_val:] for t in state["data"][1]]
    return result


def _per_epoch(totals: Optional[Dict[str, int]]) -> Dict[str, float]:
    """Mean solver work per training epoch: forward solve and adjoint solve evaluations (batch-wide)."""
    if not totals or not totals["epochs"]:
        return {}
    return {"forward_f_evals": totals["f_evals"] / totals["epochs"],
            "adjoint_evals": totals["adjoint_evals"] / totals["epochs"]}


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as in the ROSMAP reference; NaN for one value)."""
    mean, std, _ = report.mean_std(values)
    return mean, std


# ----------------------------------------------------------------------------------------------
# convergence of a trained fusion (paper Fig. 3 / Table 9)


def fusion_inputs(model: Any, data_list: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The confidence-weighted view features that enter a patched model's fusion (eval mode)."""
    fusion = adapter.model_fusion(model)
    if fusion is None:
        raise ValueError("the model has no DEQ fusion (concatenation baseline)")
    captured: Dict[str, List[torch.Tensor]] = {}

    def grab(_module, args):
        captured["x"] = [t.detach() for t in args[0]]

    handle = fusion.register_forward_pre_hook(grab)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.infer(list(data_list))
    finally:
        handle.remove()
        model.train(was_training)
    return captured["x"]


def trace_residuals(deq: torch.nn.Module, xs: Sequence[torch.Tensor], *, solver: str, steps: int) -> np.ndarray:
    """Per-sample relative residuals (B, steps) of ``steps`` solver steps from zeros, no early exit.

    A copy of the trained DEQFusion with the same weights is built in DEQ mode with ``solver``,
    ``f_max_iter=steps`` and tolerance 0, so every sample runs every step; for
    ``fixed_point_iter`` this is the weight-tied network unrolled ``steps`` times.
    """
    from dataclasses import fields

    from deqfusion import DEQFusion

    cfg = deq.config
    opts = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("dim", "num_modalities")}
    opts.update(mode="deq", f_solver=solver, f_max_iter=steps, eval_f_max_iter=None, f_tol=0.0, divergence_factor=1e30)
    probe = DEQFusion(dim=cfg.dim, num_modalities=cfg.num_modalities, **opts)
    probe.load_state_dict(deq.state_dict())
    probe.to(xs[0].device).eval()
    with torch.no_grad():
        stats = probe(list(xs)).stats
    return stats.rel_trace[:, :steps].double().cpu().numpy()


def run_traces(run: RunResult, *, steps: int = 100) -> Dict[str, np.ndarray]:
    """Fig. 3 traces of one kept run on its test inputs: a DEQ-trained fusion by its own solver and by
    plain iteration; a weight-tied (unrolled-mode) fusion by plain iteration, as it was trained."""
    if run.model is None:
        raise ValueError("run_traces needs a run made with RunSpec(keep_model=True)")
    xs = fusion_inputs(run.model, run.test_inputs)
    deq = adapter.model_fusion(run.model).deq
    if deq.config.mode == "unrolled":
        name = f"weight-tied fusion (trained unrolled {deq.config.unroll_steps} steps; plain iteration)"
        return {name: trace_residuals(deq, xs, solver="fixed_point_iter", steps=steps)}
    return {f"DEQ fusion ({deq.config.f_solver})": trace_residuals(deq, xs, solver=deq.config.f_solver, steps=steps),
            "DEQ fusion (plain iteration)": trace_residuals(deq, xs, solver="fixed_point_iter", steps=steps)}


@dataclass(frozen=True)
class Task:
    """One training run for the run pool; ``trace_steps`` > 0 computes its convergence traces (needs keep_model)."""

    spec: RunSpec
    upstream: Optional[Path] = None
    trace_steps: int = 0


def execute(task: Task, on_epoch: Optional[Callable[[int], None]] = None) -> RunResult:
    """Train one task and, for a kept run, replace the model by its convergence traces (the pool's worker)."""
    result = run(task.spec, task.upstream, on_epoch=on_epoch)
    if task.spec.keep_model and task.trace_steps > 0:
        result.traces = run_traces(result, steps=task.trace_steps)
        result.model = None
        result.test_inputs = None
    return result
