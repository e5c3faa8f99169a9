"""Run-time compatibility for upstream optimisers written against torch 1.x tensor overloads.

pytorch-pretrained-bert's ``BertAdam`` (CM-BERT's optimiser) calls ``next_m.add_(1 - beta1, grad)``
and ``next_v.addcmul_(1 - beta2, grad, grad)``: the scalar-first overloads that torch 1.5
deprecated.  Torch 2.x still accepts them with a UserWarning at every step; a torch that drops
them raises ``TypeError``.  Rather than edit the upstream (or the package), a runner wraps the
training in::

    with legacy_scalar_overloads():
        run_classifier.main(0)

While the block runs, ``Tensor.add_(Number, Tensor)`` means ``add_(Tensor, alpha=Number)`` and
``Tensor.addcmul_(Number, Tensor, Tensor)`` means ``addcmul_(Tensor, Tensor, value=Number)`` -- the
same arithmetic through the current signatures -- and the deprecation warning is silenced.  Every
other call passes through unchanged; on exit the original methods are restored, also after an
error.  Process-wide while active, like :mod:`cuda_shim`.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Iterator

import torch

__all__ = ["legacy_scalar_overloads", "torch_accepts_legacy_overloads"]


def torch_accepts_legacy_overloads() -> bool:
    """Whether this torch still takes ``add_(Number, Tensor)`` and ``addcmul_(Number, Tensor, Tensor)``."""
    t, g = torch.zeros(2), torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t.add_(0.5, g)
            t.addcmul_(0.5, g, g)
        except TypeError:
            return False
    return bool(torch.equal(t, torch.ones(2)))


def _is_scalar(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


@contextlib.contextmanager
def legacy_scalar_overloads() -> Iterator[None]:
    """Translate the scalar-first ``add_`` / ``addcmul_`` overloads to today's signatures inside the block."""
    add_, addcmul_ = torch.Tensor.add_, torch.Tensor.addcmul_
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("add_", "addcmul_")}

    def add_compat(self, *args, **kwargs):
        if len(args) == 2 and not kwargs and _is_scalar(args[0]) and isinstance(args[1], torch.Tensor):
            return add_(self, args[1], alpha=args[0])
        return add_(self, *args, **kwargs)

    def addcmul_compat(self, *args, **kwargs):
        if len(args) == 3 and not kwargs and _is_scalar(args[0]):
            return addcmul_(self, args[1], args[2], value=args[0])
        return addcmul_(self, *args, **kwargs)

    torch.Tensor.add_ = add_compat
    torch.Tensor.addcmul_ = addcmul_compat
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"This overload of add(cmul)?_ is deprecated")
            yield
    finally:
        for name, original in saved.items():
            if original is None:  # inherited from the C base class: drop our override
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
