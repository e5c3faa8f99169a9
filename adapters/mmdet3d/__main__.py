"""``python -m deqfusion.adapters.mmdet3d``: what ``apply mmdet3d`` prints; ``--config``: only the config's path."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import config_path, plugin_instructions, version_problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqfusion.adapters.mmdet3d", description=__doc__)
    parser.add_argument("--config", action="store_true", help="print the project config's path and nothing else")
    args = parser.parse_args(argv)
    if args.config:
        print(config_path())
        return 0
    print("\n".join(plugin_instructions()))
    return 1 if version_problems() else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
