"""Import-time stand-ins for dead dependencies that an upstream imports at module level but a code
path never calls.

Some upstream modules import packages that no longer install on a current Python (MultiBench's
``datasets/imdb/get_data.py`` imports gensim and, through ``vgg.py``, Theano and Blocks) although the
function a user calls never touches them.  Rather than edit the upstream, an adapter installs a
:class:`StandInFinder` for those package names:

* it sits at the **end** of ``sys.meta_path``, so it is asked only after every real finder failed:
  an installed package is always used as it is, never shadowed;
* for a stood-in package it makes a module whose every attribute (``from blocks.bricks import MLP``,
  ``theano.tensor.tensor4``) is a stand-in *class*, so that module-level code such as
  ``class VGGNet(FeedforwardSequence)`` still runs;
* calling a stand-in (or instantiating a class derived from one) raises :class:`StandInError`, which
  names the stood-in package, why it was stood in and how to use that code path for real.

``install(reasons)`` keeps the finder for the life of the process (a plain run of a patched upstream
script); ``stand_ins(reasons)`` is the same as a context manager that also removes the stand-in
modules again on exit (the runners).  Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Dict, Iterator, Mapping, Optional

__all__ = ["StandInError", "StandInFinder", "install", "uninstall", "stand_ins", "is_stand_in", "installed", "stood_in"]


class StandInError(RuntimeError):
    """Code called something from a stood-in package; the message says which, why and what to do."""


def _describe(qualname: str, top: str, reason: str) -> str:
    return (f"{qualname} was called, but {top!r} is not installed here: deqfusion stood it in at import time "
            f"because {reason}")


class _StandInMeta(type):
    """Metaclass of stand-in classes: any attribute is another stand-in, any call raises StandInError."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in_class(f"{cls.__standin_name__}.{name}", cls.__standin_top__, cls.__standin_reason__)

    def __call__(cls, *args, **kwargs):
        origin = next((b for b in cls.__mro__ if "__standin_name__" in b.__dict__), cls)
        what = origin.__standin_name__
        if origin is not cls:
            what = f"{cls.__module__}.{cls.__qualname__} (a subclass of the stand-in {what})"
        raise StandInError(_describe(what, cls.__standin_top__, cls.__standin_reason__))

    def __repr__(cls) -> str:
        return f"<stand-in {cls.__dict__.get('__standin_name__', cls.__qualname__)}>"


def _stand_in_class(qualname: str, top: str, reason: str) -> type:
    return _StandInMeta(qualname.rsplit(".", 1)[-1], (), {
        "__standin_name__": qualname, "__standin_top__": top, "__standin_reason__": reason,
        "__module__": qualname.rsplit(".", 1)[0],
    })


class StandInModule(types.ModuleType):
    """A stood-in package or submodule: attributes are stand-in classes (cached), submodules import."""

    def __init__(self, name: str, top: str, reason: str):
        super().__init__(name, f"deqfusion stand-in for {name!r} ({reason})")
        self.__standin_top__ = top
        self.__standin_reason__ = reason
        self.__path__ = []  # a package: `import blocks.bricks.conv` goes through the finder again

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in_class(f"{self.__name__}.{name}", self.__standin_top__, self.__standin_reason__)
        setattr(self, name, value)
        return value


class _Loader(importlib.abc.Loader):
    def __init__(self, top: str, reason: str):
        self.top, self.reason = top, reason

    def create_module(self, spec):
        return StandInModule(spec.name, self.top, self.reason)

    def exec_module(self, module) -> None:
        pass


class StandInFinder(importlib.abc.MetaPathFinder):
    """Finds stand-ins for ``reasons``' top-level names; last on sys.meta_path, so real packages win."""

    def __init__(self, reasons: Mapping[str, str]):
        self.reasons: Dict[str, str] = dict(reasons)

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        top = fullname.partition(".")[0]
        reason = self.reasons.get(top)
        if reason is None:
            return None
        if fullname != top and not is_stand_in(sys.modules.get(top)):
            return None  # a submodule missing from a *real* package: not ours to invent
        return importlib.util.spec_from_loader(fullname, _Loader(top, reason), is_package=True)


def is_stand_in(obj: object) -> bool:
    """True for a stand-in module or class (or a class derived from one)."""
    return isinstance(obj, StandInModule) or isinstance(obj, _StandInMeta)


def stood_in(name: str) -> bool:
    """Whether importing top-level ``name`` gives a stand-in (no real package of that name is found)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is None or isinstance(spec.loader, _Loader)


def _ours() -> Optional[StandInFinder]:
    return next((f for f in sys.meta_path if isinstance(f, StandInFinder)), None)


def installed() -> Dict[str, str]:
    """The stood-in names and reasons currently on sys.meta_path (empty if none)."""
    finder = _ours()
    return dict(finder.reasons) if finder else {}


def install(reasons: Mapping[str, str]) -> StandInFinder:
    """Put the finder (once) at the end of sys.meta_path and add ``reasons``; idempotent."""
    finder = _ours()
    if finder is None:
        finder = StandInFinder({})
        sys.meta_path.append(finder)
    for name, reason in reasons.items():
        finder.reasons.setdefault(name, reason)
    return finder


def uninstall(names: Optional[Mapping[str, str]] = None) -> None:
    """Drop stand-ins for ``names`` (all when None): from the finder and from sys.modules."""
    finder = _ours()
    drop = set(finder.reasons if finder and names is None else (names or {}))
    for mod in [m for m, v in sys.modules.items() if m.partition(".")[0] in drop and is_stand_in(v)]:
        del sys.modules[mod]
    if finder is not None:
        for name in drop:
            finder.reasons.pop(name, None)
        if not finder.reasons:
            sys.meta_path.remove(finder)


@contextlib.contextmanager
def stand_ins(reasons: Mapping[str, str]) -> Iterator[Dict[str, str]]:
    """Within the block the names in ``reasons`` import as stand-ins (where not really installed)."""
    before = installed()
    install(reasons)
    try:
        yield {k: v for k, v in reasons.items() if stood_in(k)}
    finally:
        uninstall({k: v for k, v in reasons.items() if k not in before})
