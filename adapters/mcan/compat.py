"""Run-time compatibility for MCAN's 2019-era code, installed by the runner for one run (never an edit of the clone).

``yaml_load(overrides)``  ``run.py`` calls ``yaml.load(f)`` without a Loader, a TypeError on PyYAML >= 6:
                          inside the block a missing Loader means ``yaml.SafeLoader`` (what PyYAML 5
                          warned it would become).  ``overrides`` are added to the parsed model file
                          (``cfgs/<MODEL>_model.yml``) as if it said so -- how the tests shrink the model
                          through MCAN's own config path (``{**yaml_dict, **args_dict}``, ``Cfgs.add_args``).
``word_vectors(choice)``  ``core/data/data_utils.py`` imports spaCy 2's ``en_vectors_web_lg`` (GloVe);
                          ``real`` needs it installed, ``standin`` registers :mod:`.en_vectors_standin`
                          under that name, ``auto`` takes the real one where it is importable.
``torch_threads(n)``      ``Cfgs.proc`` pins torch to 2 intra-op threads; with ``n`` the run uses ``n``
                          instead (2 threads on a busy 2-core machine wait on each other at every op:
                          a tiny MCAN ran 4x slower than on 1 here).
``process_state()``       puts back what MCAN changes for the whole process: ``CUDA_VISIBLE_DEVICES``
                          (``Cfgs.proc`` sets it), torch's thread count (it sets 2), ``sys.argv``,
                          ``sys.path`` and the modules of the clone's generic top-level packages
                          (``cfgs``, ``core``, ``utils``), and the working directory.  MCAN's
                          packages have no ``__init__.py`` (namespace packages), so a regular package
                          of the same name anywhere on ``sys.path`` would win over them -- the checkout
                          root of this project is one (its ``core/`` is ``deqfusion``), and ``python -m
                          pytest`` puts it there: such entries are left out of ``sys.path`` for the run.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Dict, Iterator, Mapping, Optional

VECTOR_CHOICES = ("auto", "real", "standin")
UPSTREAM_PACKAGES = ("cfgs", "core", "utils")
GLOVE_PACKAGE = "en_vectors_web_lg"
GLOVE_FIX = ("install spaCy 2 and its GloVe vectors, as MCAN's README says: pip install 'spacy==2.3.9' "
             "https://github.com/explosion/spacy-models/releases/download/en_vectors_web_lg-2.1.0/en_vectors_web_lg-2.1.0.tar.gz "
             "(the docker/mcan image has them)")


class CompatError(RuntimeError):
    """A run-time requirement of MCAN is missing; the message names the fix."""


@contextlib.contextmanager
def yaml_load(overrides: Optional[Mapping[str, Any]] = None) -> Iterator[None]:
    """``yaml.load(stream)`` works on PyYAML >= 6 inside the block; model files get ``overrides`` added."""
    import yaml

    original = yaml.load
    extra = dict(overrides or {})

    def load(stream, Loader=None, **kwargs):
        data = original(stream, Loader=Loader or yaml.SafeLoader, **kwargs)
        name = str(getattr(stream, "name", ""))
        if extra and isinstance(data, dict) and name.replace("\\", "/").split("/")[-1].endswith("_model.yml"):
            data = {**data, **extra}
        return data

    yaml.load = load
    try:
        yield
    finally:
        yaml.load = original


def real_vectors_available() -> bool:
    return importlib.util.find_spec(GLOVE_PACKAGE) is not None and not _is_standin(sys.modules.get(GLOVE_PACKAGE))


def _is_standin(module: Any) -> bool:
    return bool(getattr(module, "IS_STANDIN", False))


@contextlib.contextmanager
def word_vectors(choice: str = "auto") -> Iterator[str]:
    """Make ``import en_vectors_web_lg`` work for one run; yields ``"real"`` or ``"standin"``."""
    if choice not in VECTOR_CHOICES:
        raise CompatError(f"word vectors must be one of {VECTOR_CHOICES}, got {choice!r}")
    use = choice
    if choice == "auto":
        use = "real" if real_vectors_available() else "standin"
    if use == "real" and not real_vectors_available():
        raise CompatError(f"the GloVe vectors MCAN loads ({GLOVE_PACKAGE}) are not installed: {GLOVE_FIX}; "
                          f"or run with the deterministic stand-in vectors (--vectors standin), which are not GloVe")
    saved = sys.modules.get(GLOVE_PACKAGE)
    if use == "standin":
        sys.modules[GLOVE_PACKAGE] = importlib.import_module(f"{__package__}.en_vectors_standin")
    try:
        yield use
    finally:
        if use == "standin":
            if saved is None:
                sys.modules.pop(GLOVE_PACKAGE, None)
            else:
                sys.modules[GLOVE_PACKAGE] = saved


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Inside the block torch runs ``n`` intra-op threads, whatever the upstream asks for (None: as it asks)."""
    if not n:
        yield
        return
    import torch

    original = torch.set_num_threads
    original(int(n))
    torch.set_num_threads = lambda _asked: original(int(n))
    try:
        yield
    finally:
        torch.set_num_threads = original


def _shadows(entry: str) -> bool:
    """Does this sys.path entry hold a regular package named like one of MCAN's namespace packages?"""
    base = os.path.abspath(entry or os.getcwd())
    return any(os.path.isfile(os.path.join(base, name, "__init__.py")) for name in UPSTREAM_PACKAGES)


def _upstream_modules() -> Dict[str, Any]:
    return {k: v for k, v in sys.modules.items() if k.split(".")[0] in UPSTREAM_PACKAGES}


@contextlib.contextmanager
def process_state(path_entry: Optional[str] = None, argv: Optional[list] = None) -> Iterator[None]:
    """Put back, on exit, what an in-process run of MCAN changes for the whole process."""
    import torch

    saved_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    saved_threads = torch.get_num_threads()
    saved_argv = list(sys.argv)
    saved_cwd = os.getcwd()
    saved_modules = _upstream_modules()
    saved_bytecode = sys.dont_write_bytecode
    saved_path = list(sys.path)
    for name in saved_modules:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not _shadows(p)]
    if path_entry is not None:
        sys.path.insert(0, path_entry)
    if argv is not None:
        sys.argv = list(argv)
    sys.dont_write_bytecode = True  # no __pycache__ in the clone
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved_bytecode
        for name in list(_upstream_modules()):
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved_env
