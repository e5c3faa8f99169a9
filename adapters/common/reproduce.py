"""``deqfusion reproduce <upstream>``: one subcommand per upstream, found by convention.

Every adapter package ``deqfusion.adapters.<upstream>`` that has a ``reproduce`` module with
``add_parser(subparsers)`` gets a ``reproduce <upstream>`` subcommand; nothing lists them here, so
adding an upstream touches no shared file.  The modules are imported when the CLI starts, so they
keep torch and the upstream's imports inside their run functions (``deqfusion --help`` stays fast).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import List

ADAPTERS = "deqfusion.adapters"


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help once: not where the help already names its default,
    and not for flags or options whose default is None (their help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def upstreams_with_reproduce() -> List[str]:
    """Names of the adapter packages that ship a ``reproduce`` module, sorted."""
    here = Path(__file__).resolve().parents[1]
    names = []
    for info in pkgutil.iter_modules([str(here)]):
        if info.ispkg and info.name != "common" and importlib.util.find_spec(f"{ADAPTERS}.{info.name}.reproduce"):
            names.append(info.name)
    return sorted(names)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="reproduce the paper's tables on real data through an upstream's own training loop",
        description="Train an upstream baseline and its DEQ-fusion variant on the same splits and seeds, and "
                    "print the paper's tables.")
    sub = parser.add_subparsers(dest="upstream", metavar="UPSTREAM")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    for name in upstreams_with_reproduce():
        importlib.import_module(f"{ADAPTERS}.{name}.reproduce").add_parser(sub)
