"""Command line for the patched upstream clones.

Two front doors, one set of commands:
- `deqfusion list|status|apply|check|revert|refresh ...` (registered by deqfusion.cli), and
- `./apply_patches.sh <name>` / `python -m deqfusion.upstream ...` (`main` below), where a first
  argument that is not a command is an upstream name to apply.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

from . import operations
from .errors import UpstreamError
from .manifest import MANIFEST_ENV, load_manifest
from .sources import MIRROR_ENV

COMMANDS = ("list", "status", "apply", "check", "revert", "restore", "refresh")
PROG_ENV = "DEQFUSION_PROG"  # apply_patches.sh sets it so messages name the wrapper

EPILOG = f"""\
environment:
  {MIRROR_ENV}   a clone/snapshot of the upstream, or a folder of them named <name> or
                     <owner>+<repo>; clones come from there instead of the network
  {MANIFEST_ENV}  another upstreams.toml (tests use a fake upstream)
  DEQFUSION_CLONES    a folder for the clones (<name>/ in it) instead of the checkout's third_party/

typical use:
  ./apply_patches.sh list                  the upstreams, their status, pins, licenses and series
  ./apply_patches.sh mmdynamics            clone, check out the pin on branch deqfusion, apply
  cd third_party/mmdynamics && <the upstream's own training command, printed by apply>
  ./apply_patches.sh restore mmdynamics    re-apply local edits that --force saved
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="PATH",
                        help=f"the upstream manifest (default: ${MANIFEST_ENV} or the packaged upstreams.toml)")


def _dest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", metavar="DIR",
                        help="the clone (default: third_party/<name> in the deqfusion checkout)")


def _patches(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patches", metavar="DIR",
                        help="the folder of this upstream's *.patch series (default: patches/<name>)")


def _source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", metavar="PATH",
                        help=f"clone from this local clone or mirror instead of ${MIRROR_ENV} or the URL")


def _handler(prog: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UpstreamError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return err.code
    return func


def add_commands(sub, prog: str) -> None:
    """Add the commands of COMMANDS to an argparse subparsers object."""
    def add(name: str, help_: str, run: Callable[[argparse.Namespace], int], description: str = ""):
        p = sub.add_parser(name, help=help_, description=description or help_, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        p.set_defaults(func=_handler(prog, run))
        return p

    add("list", "list the upstreams: status, route, license, pinned commit, patch count",
        lambda a: operations.list_upstreams(load_manifest(a.manifest)))

    p = add("status", "show each clone's state (applied, reverted, local edits, ...)",
            lambda a: operations.status(load_manifest(a.manifest), a.names, a.dest, a.patches))
    p.add_argument("names", nargs="*", metavar="NAME", help="upstreams to show (default: all)")
    _dest(p)
    _patches(p)

    p = add("apply", "clone (or reuse) the upstream, check out its pinned commit on branch deqfusion, "
                     "apply the patch series, print the training command",
            lambda a: operations.apply(load_manifest(a.manifest), a.name, dest=a.dest, patches=a.patches,
                                       source=a.source, force=a.force, allow_planned=a.allow_planned),
            description="Clone the upstream (from --source, $DEQFUSION_MIRROR or its URL), check out the "
                        "pinned commit on branch deqfusion and apply patches/<name>/ with git am (then git am "
                        "--3way). Applying twice changes nothing (local edits on an applied clone stay as they "
                        "are). Local edits are never overwritten: without --force apply refuses, with --force "
                        "it saves them first (verified) and says where. Any failure leaves the clone as it was.")
    p.add_argument("name", help="the upstream (see `list`)")
    _dest(p)
    _patches(p)
    _source(p)
    p.add_argument("--force", action="store_true",
                   help="save local edits first (verified, in refs/deqfusion/backups/N and `git stash list`) and "
                        "keep unsaved branch commits as deqfusion-backup-N, then apply")
    p.add_argument("--allow-planned", action="store_true",
                   help="check out an upstream whose integration is still planned (not ready) anyway")

    p = add("check", "would the series apply? tried in a temporary clone; the real one is untouched",
            lambda a: operations.check(load_manifest(a.manifest), a.name, dest=a.dest, patches=a.patches,
                                       source=a.source))
    p.add_argument("name", help="the upstream (see `list`)")
    _dest(p)
    _patches(p)
    _source(p)

    p = add("revert", "put the clone back at the pinned commit (detached); branch deqfusion is kept",
            lambda a: operations.revert(load_manifest(a.manifest), a.name, dest=a.dest, force=a.force))
    p.add_argument("name", help="the upstream (see `list`)")
    _dest(p)
    p.add_argument("--force", action="store_true",
                   help="save local edits first (verified, in refs/deqfusion/backups/N and `git stash list`)")

    p = add("restore", "re-apply local edits that apply/revert --force saved (refs/deqfusion/backups/N)",
            lambda a: operations.restore(load_manifest(a.manifest), a.name, dest=a.dest, number=a.backup),
            description="`apply --force` and `revert --force` save a clone's local edits (verified) before they "
                        "change it; restore puts the newest (or --backup N) back onto the work tree: exactly when "
                        "HEAD is the commit they were made on, else as a 3-way patch.")
    p.add_argument("name", help="the upstream (see `list`)")
    _dest(p)
    p.add_argument("--backup", type=int, metavar="N", help="which backup (default: the newest)")

    p = add("refresh", "regenerate patches/<name>/ from the commits on branch deqfusion (git format-patch -U1)",
            lambda a: operations.refresh(load_manifest(a.manifest), a.name, dest=a.dest, patches=a.patches,
                                         message=a.message, force=a.force),
            description="Patch authoring: edit the clone, commit on branch deqfusion (or pass -m), then "
                        "refresh writes one patch per commit since the pinned commit into patches/<name>/.")
    p.add_argument("name", help="the upstream (see `list`)")
    _dest(p)
    _patches(p)
    p.add_argument("-m", "--message", help="first commit the clone's edits to tracked files with this message")
    p.add_argument("--force", action="store_true", help="ignore uncommitted edits (they stay out of the series)")


def register(subparsers) -> None:
    """Hook for deqfusion.cli: adds the COMMANDS to `deqfusion`, and the same
    commands grouped as `deqfusion upstream <command>`."""
    add_commands(subparsers, "deqfusion")
    group = subparsers.add_parser("upstream", help="the same commands, grouped: deqfusion upstream apply NAME",
                                  description="Pinned upstream clones with deqfusion's patch series.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(group.add_subparsers(dest="upstream_command", metavar="COMMAND"), "deqfusion upstream")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    prog = prog or os.environ.get(PROG_ENV) or "python -m deqfusion.upstream"
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [-h] {{NAME | {'|'.join(COMMANDS)}}} ...",
        description="Pinned upstream clones with deqfusion's patch series. "
                    f"`{prog} NAME [options]` is `{prog} apply NAME [options]`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub, prog)
    return parser


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "apply")  # ./apply_patches.sh imvotenet == ./apply_patches.sh apply imvotenet
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
