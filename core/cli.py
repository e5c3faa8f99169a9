"""The `deqfusion` command: each subcommand lives in its own module and registers itself here.

A module listed in COMMANDS exposes `register(subparsers)`; it is imported only when the CLI
starts, so `deqfusion --help` stays fast and a missing optional extra names itself.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# A command's results (tables, paths written) go to this logger; main() sends it to stdout.
REPORT = "deqfusion.report"
log = logging.getLogger("deqfusion.cli")

# Optional dependencies and the extra of setup.py that brings each (a missing one is a one-line error).
OPTIONAL = {
    "numpy": "mmdynamics", "sklearn": "mmdynamics", "matplotlib": "plot", "torchdeq": "bench",
    "h5py": "multibench", "transformers": "cmbert", "pytorch_pretrained_bert": "cmbert", "yaml": "mcan",
    "mmdet3d": "mmdet3d", "mmcv": "mmdet3d", "mmengine": "mmdet3d", "bootstrap": "mutan",
}

# (module, what it adds) -- order is the order in --help.
COMMANDS = [
    "deqfusion.demo",            # demo / convergence: the paper's Table 9 and Fig. 3 on generated data
    "deqfusion.upstream.cli",    # list / status / apply / check / revert / refresh (patched upstream clones)
    "deqfusion.adapters.common.reproduce",  # reproduce <upstream>: the paper's tables, one subcommand per adapter
    "deqfusion.adapters.cmbert.convert",    # cmbert-bert: CM-BERT's 'pre-trained BERT' folder from a transformers BERT
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqfusion",
        description="Deep Equilibrium Multimodal Fusion: demos, upstream patching, reproductions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a subcommand whose module is not written yet, or a missing extra
            if err.name and (err.name == name or name.startswith(err.name)):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _report_to(sys.stdout)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top not in OPTIONAL:
            raise
        given = list(sys.argv[1:] if argv is None else argv)
        words = [w for w in given[given.index(args.command):][:2] if not w.startswith("-")] if args.command in given \
            else [args.command]
        what = " ".join(words)
        log.error("deqfusion %s needs the package %r, which is not installed: pip install 'deqfusion[%s]'",
                  what, top, OPTIONAL[top])
        return 2


def _report_to(stream) -> None:
    """Send the report logger's records, unadorned, to `stream` (replacing an earlier main()'s handler)."""
    report = logging.getLogger(REPORT)
    for handler in list(report.handlers):
        report.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    report.addHandler(handler)
    report.setLevel(logging.INFO)
    report.propagate = False


if __name__ == "__main__":
    sys.exit(main())
