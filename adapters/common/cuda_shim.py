"""Opt-in runtime shim for upstream code that calls ``.cuda()`` unconditionally.

MM-Dynamics' ``train_test.py`` moves the labels and the model to the GPU with bare ``.cuda()``
calls, so it cannot run on a machine without CUDA.  Rather than edit the upstream, a runner wraps
the upstream call in::

    with cuda_redirect("cpu"):
        train_test.train(...)

While the block runs, ``torch.Tensor.cuda(...)`` and ``torch.nn.Module.cuda(...)`` move to the given
device instead (``.to(device)``); on exit the original methods are restored, also after an error.
Nothing else in torch changes (``torch.cuda.is_available()`` still tells the truth).  The shim is
process-wide while active, so it is not meant for use from several threads at once; nested use is
fine.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
from torch import nn

__all__ = ["cuda_redirect", "resolve_device"]


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' = CUDA when available, else CPU; an explicit 'cuda' without CUDA is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False; use --device cpu")
    return dev


@contextlib.contextmanager
def cuda_redirect(device: Union[str, torch.device] = "cpu") -> Iterator[torch.device]:
    """Make ``Tensor.cuda()`` / ``Module.cuda()`` mean ``.to(device)`` inside the block."""
    target = torch.device(device)
    saved = {cls: cls.__dict__.get("cuda") for cls in (torch.Tensor, nn.Module)}

    def tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self.to(target, non_blocking=non_blocking, memory_format=memory_format)

    def module_cuda(self, device=None):
        return self.to(target)

    torch.Tensor.cuda = tensor_cuda
    nn.Module.cuda = module_cuda
    try:
        yield target
    finally:
        for cls, original in saved.items():
            if original is None:  # inherited (Tensor.cuda lives on the C base class): drop our override
                delattr(cls, "cuda")
            else:
                cls.cuda = original
