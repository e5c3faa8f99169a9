"""Context managers a runner wraps an upstream's own entry point in: each puts back what it changed."""
from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


@contextlib.contextmanager
def patched_attrs(obj: Any, **new: Any) -> Iterator[None]:
    """Set attributes of a module or object for the block (an upstream function swapped for ours)."""
    old = {k: getattr(obj, k) for k in new}
    for k, v in new.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """Run the block in `path` (upstreams that read data relative to their own folder)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def argv(args: Sequence[str]) -> Iterator[None]:
    """`sys.argv` for an upstream entry point that parses its own command line."""
    old = sys.argv
    sys.argv = list(args)
    try:
        yield
    finally:
        sys.argv = old


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count for the block; None or 0 leaves it as it is."""
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators, as the upstreams seed them."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
