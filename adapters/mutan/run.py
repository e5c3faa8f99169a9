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
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from . import compat


def main(argv: Optional[Sequence[str]] = None) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    compat.install()
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    if os.getcwd() not in sys.path:  # `python -m` puts the working directory first; a direct call may not
        sys.path.insert(0, os.getcwd())
    sys.argv = ["bootstrap.run", *args]

    from bootstrap import run as bootstrap_run

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
