"""``python -m deqfusion.adapters.mutan.run [ARGS]``: bootstrap's own ``python -m bootstrap.run [ARGS]``
on a current Python, with three run-time measures and nothing else changed.

1. :func:`deqfusion.adapters.mutan.compat.install` (``collections.Mapping``, ``yaml.load`` without a
   Loader) -- a no-op on the era's Python 3.9 / PyYAML 5 (the Docker image runs bootstrap.run directly);
2. block's metric starts the VQA evaluation as ``python -m block.models.metrics.compute_oe_accuracy ... &``,
   i.e. whatever ``python`` is first on PATH: this interpreter's folder is put first on PATH, so the
   evaluation runs with the same packages as the training;
3. bootstrap's ``main`` logs an exception to ``logs.txt`` and returns normally (exit status 0 after a
   crash); here it is given bootstrap's own ``run`` wrapped so that a failure is remembered, and the
   exit status is 1 when the run failed.

Run it from the block clone's root, as ``bootstrap.run`` itself (``block`` is imported from there).

``-o mutan`` / ``-o mutan_deq`` (a name, not an existing file) is short for the project's options file of
that name (``python -m deqfusion.adapters.mutan.options NAME`` prints its path); any other ``-o`` is bootstrap's.

One option of its own, taken out before bootstrap parses the rest: ``--deqfusion-grad-log PATH`` writes,
for every training step, the gradient of the network's answer fusion (``net.fusion``: block's Mutan or
the DEQ classifier) -- its norm and how many of its parameter tensors received a non-zero, finite
gradient -- to the JSON file PATH (a diagnostic; the tests use it to see the fusion being trained).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import compat

GRAD_LOG_FLAG = "--deqfusion-grad-log"


def _split_grad_log(args: List[str]) -> Tuple[List[str], Optional[str]]:
    out, path, i = [], None, 0
    while i < len(args):
        if args[i] == GRAD_LOG_FLAG:
            if i + 1 >= len(args):
                raise SystemExit(f"{GRAD_LOG_FLAG} needs a path")
            path, i = args[i + 1], i + 2
        elif args[i].startswith(GRAD_LOG_FLAG + "="):
            path, i = args[i].split("=", 1)[1], i + 1
        else:
            out.append(args[i])
            i += 1
    return out, path


def _resolve_options(args: List[str]) -> List[str]:
    """``-o mutan_deq`` -> ``-o /abs/path/to/deqfusion/adapters/mutan/options/mutan_deq.yaml``."""
    from . import options

    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in ("-o", "--path_opts"):
            if eq:
                if value in options.NAMES and not os.path.exists(value):
                    out[i] = f"{flag}={options.path(value)}"
            elif i + 1 < len(out) and out[i + 1] in options.NAMES and not os.path.exists(out[i + 1]):
                out[i + 1] = str(options.path(out[i + 1]))
    return out


def _fusion_gradients(engine: Any) -> Dict[str, Any]:
    net = engine.model.network
    net = getattr(net, "module", net)
    params = [p for p in net.fusion.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    reached = sum(1 for g in grads if g is not None and bool(g.isfinite().all()) and float(g.abs().sum()) > 0)
    sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return {"epoch": int(engine.epoch), "fusion": type(net.fusion).__name__, "tensors": len(params),
            "reached": reached, "grad_norm": math.sqrt(sq) if math.isfinite(sq) else float("nan")}


def _record_gradients(path: str) -> None:
    """Wrap bootstrap's engine factory so that the engine logs the fusion's gradients to ``path``."""
    from bootstrap import engines

    make_engine = engines.factory
    records: List[Dict[str, Any]] = []

    def write() -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(records, fh)
        os.replace(tmp, path)

    def factory(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        engine.register_hook("train_on_backward", lambda: records.append(_fusion_gradients(engine)))
        engine.register_hook("train_on_end_epoch", write)
        return engine

    engines.factory = factory


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, grad_log = _split_grad_log(list(sys.argv[1:] if argv is None else argv))
    args = _resolve_options(args)
    compat.install()
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    if os.getcwd() not in sys.path:  # `python -m` puts the working directory first; a direct call may not
        sys.path.insert(0, os.getcwd())
    sys.argv = ["bootstrap.run", *args]

    from bootstrap import run as bootstrap_run

    if grad_log:
        _record_gradients(os.path.abspath(grad_log))
    failures: List[BaseException] = []

    def run_and_record(path_opts=None):
        try:
            bootstrap_run.run(path_opts=path_opts)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                failures.append(exit_)
            raise
        except BaseException as err:
            failures.append(err)
            raise

    bootstrap_run.main(run=run_and_record)
    if failures:
        err = failures[0]
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
        sys.stderr.write(f"bootstrap.run failed: {type(err).__name__}: {err} (the traceback is in the "
                         "experiment's logs.txt)\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
