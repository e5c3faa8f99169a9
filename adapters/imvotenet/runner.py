"""Drive ImVoteNet's own ``train.py`` and ``eval.py`` (pinned a885634, patched) unchanged.

Each run is a fresh process started by :func:`run_script`::

    python -m deqfusion.adapters.imvotenet.runner [launcher options] -- train.py --use_imvotenet ...

That launcher (:func:`main`) installs the run-time shims in its own process and then runs the
upstream script as ``__main__`` (``runpy``), with the script's own argument parser:

* on a machine without CUDA (or ``--device cpu``): ``Tensor.cuda()`` / ``Module.cuda()`` mean
  ``.to(cpu)`` (:func:`deqfusion.adapters.common.cuda_shim.cuda_redirect`), and ``pointnet2._ext`` is
  the project's pure-PyTorch stand-in (:mod:`.shims`); on CUDA the compiled extension is used if
  it is installed, else the stand-in;
* ``trimesh.io`` is aliased to ``trimesh.exchange`` where trimesh is newer than 3.0 (:mod:`.shims`);
* torch, numpy and random are seeded (ImVoteNet seeds nothing itself; its train loop re-seeds numpy
  from the OS every epoch, so augmentation and point sampling still differ between runs);
* the fusion's per-iteration record goes to ``--deq-log``: the forward solve per scene (steps,
  residuals, status; written by the adapter's wrapped ``get_loss``) and, before every optimizer step,
  the adjoint solve and the gradient norm of the fusion's parameters.

The scripts find SUN RGB-D through paths relative to their own files (``<clone>/sunrgbd/...``), so a
run happens in a *workspace*: a folder of symbolic links to the clone's files whose ``sunrgbd/`` also
links the data folders. The clone itself is not written to (the launcher writes no ``.pyc`` files).
Fusion settings travel as ``DEQFUSION_IMVOTENET_*`` variables (the shared settings mechanism).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import imvotenet as adapter
from . import data as sunrgbd

UPSTREAM_NAME = "imvotenet"
UPSTREAM_COMMIT = "a8856345146bacf29a57266a2f0b874406fd8823"
# eval.py flags of the README's evaluation command (the numbers ImVoteNet reports)
README_EVAL_FLAGS = ("--cluster_sampling", "seed_fps", "--use_3d_nms", "--use_cls_nms", "--per_class_proposal")
# train.py flags of the paper's 140-epoch schedule (the manifest's training command)
PAPER_TRAIN_FLAGS = ("--max_epoch", "140", "--lr_decay_steps", "80,120", "--lr_decay_rates", "0.1,0.1")


class UpstreamError(RuntimeError):
    """The ImVoteNet clone is missing, not patched, or its script failed; the message says what to do."""


def check_upstream(path: Optional[Path] = None) -> Path:
    """The patched clone: ``path``, else where ``./apply_patches.sh imvotenet`` puts it."""
    from deqfusion.upstream.paths import CLONES_ENV, clone_dir

    path = clone_dir(UPSTREAM_NAME, path)
    fix = (f"run ./apply_patches.sh {UPSTREAM_NAME} (or `deqfusion apply {UPSTREAM_NAME}`) from the deqfusion "
           f"checkout, or pass --upstream / ${CLONES_ENV} (a folder holding {UPSTREAM_NAME}/) pointing at a clone of "
           f"facebookresearch/imvotenet at {UPSTREAM_COMMIT[:7]} with patches/{UPSTREAM_NAME}/*.patch applied")
    for name in ("train.py", "eval.py", "models/imvotenet.py", "sunrgbd/sunrgbd_detection_dataset.py"):
        if not (path / name).is_file():
            raise UpstreamError(f"no ImVoteNet clone at {path} ({name} missing); {fix}")
    if "deq_adapter" not in (path / "models" / "imvotenet.py").read_text(encoding="utf-8", errors="replace"):
        raise UpstreamError(f"{path}/models/imvotenet.py is not patched for DEQ fusion; {fix}")
    return path


# ----------------------------------------------------------------------------------------------
# workspace


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
        raise UpstreamError(f"{dst} is in the way of the workspace link to {src}; remove it or use another workspace")
    dst.symlink_to(src, target_is_directory=src.is_dir())


def make_workspace(clone: Path, data_root: Path, work: Path) -> Path:
    """``work``/upstream: links to every entry of the clone, and a ``sunrgbd/`` linking the clone's
    sunrgbd files plus the data folders of ``data_root``. Returns the folder to run the scripts in."""
    clone, data_root = Path(clone).resolve(), Path(data_root).resolve()
    shadow = Path(work) / "upstream"
    (shadow / "sunrgbd").mkdir(parents=True, exist_ok=True)
    for entry in sorted(clone.iterdir()):
        if entry.name in (".git", "sunrgbd") or entry.name.startswith("log"):
            continue
        _link(entry, shadow / entry.name)
    for entry in sorted((clone / "sunrgbd").iterdir()):
        if entry.suffix == ".py":
            _link(entry, shadow / "sunrgbd" / entry.name)
    for split in sunrgbd.SPLITS:
        for folder in (sunrgbd.pc_dir(data_root, split), sunrgbd.box2d_dir(data_root, split)):
            if folder.is_dir():
                _link(folder, shadow / "sunrgbd" / folder.name)
    _link(sunrgbd.raw_dir(data_root), shadow / "sunrgbd" / "sunrgbd_trainval")
    return shadow


# ----------------------------------------------------------------------------------------------
# one script run


def settings_env(settings: adapter.Settings) -> Dict[str, str]:
    """The ``DEQFUSION_IMVOTENET_*`` variables that make the patched model build ``settings``."""
    prefix = adapter.ENV_PREFIX
    opts = ",".join(f"{k}={v!r}" for k, v in sorted(settings.options.items()))
    return {prefix + "FUSION": settings.fusion, prefix + "ABLATION": settings.ablation,
            prefix + "JAC_WEIGHT": repr(float(settings.jac_weight)), prefix + "OPTIONS": opts}


@dataclass
class ScriptRun:
    """What one run of train.py or eval.py left: exit code, its stdout, and the DEQ record."""

    script: str
    returncode: int
    stdout_path: Path
    deq_log: Path
    wall_s: float
    args: List[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def deq_records(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        return read_deq_log(self.deq_log, kind)


def run_script(script: str, args: Sequence[str], *, workspace: Path, settings: adapter.Settings,
               out_dir: Path, device: str = "auto", seed: int = 0, threads: Optional[int] = 1,
               python: Optional[str] = None, timeout: Optional[float] = None,
               on_line: Optional[Callable[[str], None]] = None, check: bool = True) -> ScriptRun:
    """Run ``script`` (train.py / eval.py) of the workspace in a fresh launcher process.

    Its output goes line by line to ``out_dir/<script>.stdout.txt`` (kept whatever happens) and to
    ``on_line``; ``check`` turns a non-zero exit into an UpstreamError quoting the output's tail.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(script).stem
    stdout_path = out_dir / f"{stem}.stdout.txt"
    deq_log = out_dir / f"{stem}.deq.jsonl"
    cmd = [python or sys.executable, "-m", "deqfusion.adapters.imvotenet.runner", "--device", device,
           "--seed", str(seed), "--deq-log", str(deq_log)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--", script, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(adapter.ENV_PREFIX)}
    env.update(settings_env(settings))
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(stdout_path, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=str(workspace), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if on_line is not None:
                    on_line(line)
            code = proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    run = ScriptRun(script, code, stdout_path, deq_log, time.perf_counter() - t0, list(args))
    if check and code != 0:
        tail = "".join(run.stdout.splitlines(keepends=True)[-25:])
        raise UpstreamError(f"{script} exited with {code} (full output: {stdout_path}):\n{tail}")
    return run


def read_deq_log(path: Path, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The JSON records of a launcher's ``--deq-log`` (``kind``: 'forward', 'step' or None for all)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# the upstream's numbers

_EVAL_LINE = re.compile(r"^eval (?P<key>.+?): (?P<value>-?[0-9.]+(?:e-?\d+)?|nan)$")


def parse_eval_log(text: str) -> List[Dict[str, float]]:
    """The metric blocks ImVoteNet logs ('eval <key>: <value>' lines); a new block starts at each
    repeated key. eval.py logs one block per IoU threshold, train.py one per tower."""
    blocks: List[Dict[str, float]] = []
    current: Dict[str, float] = {}
    for line in text.splitlines():
        m = _EVAL_LINE.match(line.strip())
        if not m or m.group("key").startswith("mean "):
            continue
        key, value = m.group("key"), float(m.group("value"))
        if key in current:
            blocks.append(current)
            current = {}
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


def eval_maps(dump_dir: Path, thresholds: Sequence[float] = (0.25, 0.5)) -> Dict[str, float]:
    """mAP (in %) per IoU threshold from eval.py's ``log_eval.txt``."""
    log_path = Path(dump_dir) / "log_eval.txt"
    if not log_path.is_file():
        raise UpstreamError(f"eval.py wrote no {log_path}")
    blocks = [b for b in parse_eval_log(log_path.read_text()) if "mAP" in b]
    if len(blocks) != len(thresholds):
        raise UpstreamError(f"{log_path}: expected {len(thresholds)} mAP blocks, found {len(blocks)}")
    return {f"mAP@{t:g}": 100.0 * b["mAP"] for t, b in zip(thresholds, blocks)}


# ----------------------------------------------------------------------------------------------
# one training run: train.py, then eval.py on the checkpoint it wrote


@dataclass(frozen=True)
class RunSpec:
    """One row of Table 4: ImVoteNet trained by its train.py with ``settings``, scored by its eval.py."""

    settings: adapter.Settings
    data_root: Path
    epochs: int = 140
    batch_size: int = 8
    num_point: int = 20000
    num_target: int = 256
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    python: Optional[str] = None

    def train_args(self, log_dir: Path, dump_dir: Path) -> List[str]:
        """train.py's flags: the paper's 140-epoch schedule, its decay epochs scaled to ``epochs``."""
        steps = [max(1, round(e * self.epochs / 140)) for e in (80, 120)]
        return ["--use_imvotenet", "--log_dir", str(log_dir), "--dump_dir", str(dump_dir),
                "--max_epoch", str(self.epochs), "--lr_decay_steps", ",".join(map(str, steps)),
                "--lr_decay_rates", "0.1,0.1", "--batch_size", str(self.batch_size), "--num_point", str(self.num_point),
                "--num_target", str(self.num_target), "--num_workers", str(self.num_workers)]

    def eval_args(self, checkpoint: Path, dump_dir: Path) -> List[str]:
        """eval.py's flags: the README's evaluation command (mAP at IoU 0.25 and 0.5)."""
        return ["--use_imvotenet", "--checkpoint_path", str(checkpoint), "--dump_dir", str(dump_dir),
                "--batch_size", str(self.batch_size), "--num_point", str(self.num_point),
                "--num_target", str(self.num_target), *README_EVAL_FLAGS]


@dataclass
class RunResult:
    settings: Dict[str, Any]
    maps: Dict[str, float]            # mAP@0.25, mAP@0.5 in %
    train: ScriptRun
    eval: ScriptRun
    checkpoint: Path

    def deq_summary(self) -> Dict[str, Any]:
        """Mean solver steps, worst residual and status counts over the training iterations (DEQ rows;
        the in-loop evaluation's solves are left out)."""
        fwd = [r for r in self.train.deq_records("forward") if r.get("training")]
        if not fwd:
            return {}
        steps = [n for r in fwd for n in r["nstep"]]
        status: Dict[str, int] = {}
        for r in fwd:
            for st in r["status"]:
                status[st] = status.get(st, 0) + 1
        return {"iterations": len(fwd), "nstep_mean": sum(steps) / len(steps),
                "rel_residual_max": max(x for r in fwd for x in r["rel_residual"]), "status": status}

    def to_json(self) -> Dict[str, Any]:
        return {"settings": self.settings, "maps": self.maps, "checkpoint": str(self.checkpoint),
                "train": {"wall_s": self.train.wall_s, "stdout": str(self.train.stdout_path),
                          "deq_log": str(self.train.deq_log)},
                "eval": {"wall_s": self.eval.wall_s, "stdout": str(self.eval.stdout_path)},
                "deq": self.deq_summary()}


def run(spec: RunSpec, out: Path, upstream: Optional[Path] = None,
        on_line: Optional[Callable[[str], None]] = None) -> RunResult:
    """Train with the upstream's train.py in ``out``, then score the checkpoint with its eval.py."""
    clone = check_upstream(upstream)
    out = Path(out).resolve()
    workspace = make_workspace(clone, spec.data_root, out / "workspace")
    common = dict(workspace=workspace, settings=spec.settings, device=spec.device, seed=spec.seed,
                  threads=spec.threads, python=spec.python, on_line=on_line)
    train = run_script("train.py", spec.train_args(out / "log", out / "dump"), out_dir=out, **common)
    checkpoint = out / "log" / "checkpoint.tar"
    if not checkpoint.is_file():
        raise UpstreamError(f"train.py wrote no checkpoint at {checkpoint} (output: {train.stdout_path})")
    ev = run_script("eval.py", spec.eval_args(checkpoint, out / "eval"), out_dir=out, **common)
    return RunResult({"fusion": spec.settings.fusion, "describe": spec.settings.describe(),
                      "jac_weight": spec.settings.jac_weight, "options": spec.settings.fusion_kwargs()},
                     eval_maps(out / "eval"), train, ev, checkpoint)


# ----------------------------------------------------------------------------------------------
# the launcher (runs inside the fresh process)

log = logging.getLogger("deqfusion.adapters.imvotenet.runner")


_RECORD = re.compile(r"^deq (?P<kind>\w+) (?P<json>\{.*\})$", re.S)


class _JsonLines(logging.Handler):
    """Writes the 'deq <kind> {json}' records of the adapter's logger as JSON lines."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.fh = open(path, "a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        m = _RECORD.match(record.getMessage())
        if m:
            self.fh.write(json.dumps({"kind": m.group("kind"), **json.loads(m.group("json"))}) + "\n")
            self.fh.flush()


def _step_record() -> Dict[str, Any]:
    """Before an optimizer step: the fusion's gradient norm and its latest adjoint solve."""
    import torch

    grads, params, nonzero = [], 0, 0
    backward: Dict[str, Any] = {}
    for fusion in adapter.live_fusions():
        for p in fusion.parameters():
            params += 1
            if p.grad is not None:
                g = float(p.grad.detach().float().norm())
                grads.append(g)
                nonzero += g > 0
        stats = getattr(fusion.last_stats, "backward", None)
        if stats is not None:
            from deqfusion.solvers import Status

            backward = {"nstep": stats.nstep.tolist(), "rel_residual": [float(f"{v:.4g}") for v in stats.rel_lowest.tolist()],
                        "status": [Status(int(s)).name.lower() for s in stats.status.tolist()]}
    norm = float(torch.tensor(grads).norm()) if grads else 0.0
    return {"fusion_grad_norm": norm, "fusion_params": params, "fusion_params_with_grad": nonzero, "backward": backward}


def _install_step_hook() -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def hook(optimizer, args, kwargs):
        if adapter.live_fusions():
            adapter.log.info("deq step %s", json.dumps(_step_record()))

    register_optimizer_step_pre_hook(hook)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The launcher: shims, seeds and logging, then the upstream script as __main__."""
    parser = argparse.ArgumentParser(prog="python -m deqfusion.adapters.imvotenet.runner",
                                     description="Run an ImVoteNet script (train.py / eval.py) with deqfusion's shims.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (cpu: .cuda() shim + pure-PyTorch ops)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--deq-log", type=Path, default=None, help="JSON lines of the fusion's solver statistics")
    parser.add_argument("script", help="train.py or eval.py, in the current directory")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    args = opts.script_args[1:] if opts.script_args[:1] == ["--"] else opts.script_args

    import random

    import numpy as np
    import torch

    from ..common.cuda_shim import cuda_redirect, resolve_device
    from . import shims

    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if opts.deq_log is not None:
        deq_logger = logging.getLogger(adapter.log.name)
        deq_logger.setLevel(logging.INFO)
        deq_logger.addHandler(_JsonLines(opts.deq_log))
        deq_logger.propagate = False
        _install_step_hook()

    notes = []
    with contextlib.ExitStack() as stack:
        real_ext = False
        if device.type == "cuda":
            try:
                import pointnet2._ext  # noqa: F401  (the compiled extension, if built)
                real_ext = True
            except ImportError:
                pass
        if not real_ext:
            stack.enter_context(shims.install_pointnet2_ext())
            notes.append("pointnet2._ext = deqfusion's pure-PyTorch stand-in")
        if device.type != "cuda":
            stack.enter_context(cuda_redirect(device))
            stack.enter_context(shims.legacy_cuda_tensors(device))
            notes.append(f".cuda() and torch.cuda.<Type>Tensor -> {device}")
        if shims.install_trimesh_io_alias():
            notes.append("trimesh.io -> trimesh.exchange")
        print(f"[deqfusion] {opts.script}: {'; '.join(notes) or 'no shims'}; fusion: "
              f"{adapter.current_settings().describe()}", flush=True)
        script = os.path.abspath(opts.script)  # not resolved: the upstream finds its data relative to this path
        sys.dont_write_bytecode = True  # no __pycache__ in the clone (its few files compile in well under a second)
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(script))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
