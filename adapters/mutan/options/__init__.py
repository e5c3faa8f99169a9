"""The project's bootstrap options for Mutan: ``mutan.yaml`` (the baseline, its fusion type fixed) and
``mutan_deq.yaml`` (DEQ fusion).  They ship inside the package, so the training command names them by
absolute path: ``python -m bootstrap.run -o "$(python -m deqfusion.adapters.mutan.options mutan_deq)"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
NAMES = ("mutan", "mutan_deq")


def path(name: str = "mutan_deq") -> Path:
    """Absolute path of the options file ``name`` (``mutan`` or ``mutan_deq``, with or without ``.yaml``)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in NAMES:
        raise ValueError(f"unknown Mutan options {name!r}; choose one of {', '.join(NAMES)}")
    found = HERE / f"{stem}.yaml"
    if not found.is_file():
        raise FileNotFoundError(f"{found} is missing from the installed package: reinstall deqfusion "
                                "(pip install '.[mutan]' from the checkout)")
    return found


def paths() -> Dict[str, Path]:
    return {name: path(name) for name in NAMES}
