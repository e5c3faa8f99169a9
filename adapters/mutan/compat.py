"""Run-time compatibility of bootstrap.pytorch 0.0.13 (2019) with Python >= 3.10 and PyYAML >= 6.

bootstrap.pytorch 0.0.13, the last release and the one block.bootstrap.pytorch 0.1.6 installs, has
two era traps on a current Python (the fixes in its git history were never released):

* ``collections.Mapping`` (``lib/options.py``, ``lib/logger.py``, ``datasets/transforms.py``): the
  aliases of ``collections.abc`` left ``collections`` in Python 3.10;
* ``yaml.load(yaml_file)`` without a ``Loader`` (``lib/options.py``): PyYAML 6 made the argument
  required.  PyYAML 5 used ``FullLoader`` when none was given, so that is what is filled in;
* ``bootstrap.models.metrics.accuracy.accuracy`` (the top-1/top-5 accuracy block's VQA metric logs)
  calls ``.view(-1)`` on a slice of ``pred.t().eq(...)``, which current torch leaves non-contiguous
  (a RuntimeError for top-5).  Where that happens, the function is replaced by :func:`topk_accuracy`,
  the same numbers computed without the view.  It is installed before block's metric modules import
  the name (``run.py`` calls :func:`install` first);
* ``torch.nn.utils.clip_grad_norm_`` returns a tensor since torch 1.x (a float in 2019): block's
  optimizer logs that tensor (``train_batch.norm``), and bootstrap's logger then fails to write
  ``logs.json`` ("Object of type Tensor is not JSON serializable") for the whole run.  The logger's
  ``log_value`` is wrapped to store a one-element tensor as its Python number, as then.

:func:`install` puts both back for the running process, without touching any installed file; it
changes nothing where the interpreter and PyYAML are of the era (Python <= 3.9 with PyYAML 5, as in
``docker/mutan/Dockerfile``).  ``python -m deqfusion.adapters.mutan.run`` calls it before it starts
bootstrap's own entry point.
"""
from __future__ import annotations

import collections
import collections.abc
import functools
from typing import List

__all__ = ["install", "installed", "topk_accuracy"]

_ALIASES = ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable", "Callable", "Set")
_done: List[str] = []


def _collections_aliases() -> List[str]:
    added = []
    for name in _ALIASES:
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
            added.append(f"collections.{name}")
    return added


def _yaml_default_loader() -> List[str]:
    try:
        import yaml
    except ImportError:  # bootstrap needs PyYAML; its own import error says so
        return []
    load = yaml.load
    if getattr(load, "_deqfusion_default_loader", False):
        return []
    try:
        load("a: 1")
        return []  # PyYAML < 6: a Loader is optional already
    except TypeError:
        pass

    @functools.wraps(load)
    def load_with_default(stream, Loader=None, **kwargs):  # noqa: N803 - PyYAML's own argument name
        return load(stream, Loader=Loader or yaml.FullLoader, **kwargs)

    load_with_default._deqfusion_default_loader = True  # type: ignore[attr-defined]
    yaml.load = load_with_default
    return ["yaml.load(stream) -> yaml.load(stream, Loader=yaml.FullLoader)"]


def topk_accuracy(output, target, topk=(1, 5), ignore_index=None):
    """Top-k accuracies in % (a list of 0-dim tensors, one per k), as bootstrap's ``accuracy`` returns them:
    the share of rows whose target is among the k highest outputs (rows with ``ignore_index`` dropped)."""
    target = target.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        output, target = output[keep], target[keep]
    pred = output.topk(max(topk), 1, True, True)[1]
    hit = pred.eq(target.unsqueeze(1))
    return [hit[:, :k].any(1).float().sum(0) * (100.0 / target.size(0)) for k in topk]


def _accuracy_without_view() -> List[str]:
    try:
        import torch
        from bootstrap.models.metrics import accuracy as module
    except ImportError:
        return []
    if getattr(module.accuracy, "_deqfusion_compat", False):
        return []
    try:
        module.accuracy(torch.eye(6)[:3], torch.arange(3).view(3, 1), topk=[1, 5])
        return []  # the era's torch: the original works
    except RuntimeError:
        pass
    topk_accuracy._deqfusion_compat = True  # type: ignore[attr-defined]
    module.accuracy = topk_accuracy
    return ["bootstrap.models.metrics.accuracy.accuracy -> topk_accuracy (no .view of a non-contiguous slice)"]


def _logger_numbers() -> List[str]:
    try:
        import torch
        from bootstrap.lib.logger import Logger
    except ImportError:
        return []
    log_value = Logger.log_value
    if getattr(log_value, "_deqfusion_compat", False):
        return []

    @functools.wraps(log_value)
    def log_number(self, name, value, stack_displacement=2, *args, **kwargs):
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        # one frame more (this wrapper), so that the printed caller stays the upstream's line
        return log_value(self, name, value, stack_displacement + 1, *args, **kwargs)

    log_number._deqfusion_compat = True  # type: ignore[attr-defined]
    Logger.log_value = log_number
    return ["bootstrap.lib.logger.Logger.log_value: one-element tensors are logged as numbers"]


def install() -> List[str]:
    """Make bootstrap.pytorch 0.0.13 importable and runnable here; returns what was changed (idempotent)."""
    changed = _collections_aliases() + _yaml_default_loader() + _accuracy_without_view() + _logger_numbers()
    _done.extend(changed)
    return changed


def installed() -> List[str]:
    """What :func:`install` has changed in this process so far."""
    return list(_done)
