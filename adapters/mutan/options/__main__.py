"""``python -m deqfusion.adapters.mutan.options [mutan|mutan_deq]``: print the options file's absolute path."""
from __future__ import annotations

import sys

from . import NAMES, path


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(f"usage: python -m deqfusion.adapters.mutan.options [{'|'.join(NAMES)}]  (default mutan_deq)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        print(path(args[0] if args else "mutan_deq"))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
