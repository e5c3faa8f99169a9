"""The one way settings reach patched upstream code.

A patched upstream builds its model itself, so nothing reaches the fusion through its constructor.
Every adapter therefore reads its settings the same way:

1. the settings a runner (or a user's script) set with ``Settings.configure(...)``, a context
   manager, else
2. environment variables ``DEQFUSION_<UPSTREAM>_<FIELD>`` (a plain run of the upstream's own
   command on a patched clone), e.g. ``DEQFUSION_MMDYNAMICS_JAC_WEIGHT=0.1``.

Each upstream subclasses :class:`FusionSettings` (a strict frozen dataclass, like a PEFT config)
with its defaults and any fields of its own.  Everything is validated when the settings are made:
an unknown field, an unknown ``DEQFUSION_<UPSTREAM>_*`` variable, a misspelled DEQFusion option
(checked against :class:`deqfusion.FusionConfig`'s names) is an error that names the fix.

Environment values: ``FUSION=deq|<baseline>``, ``ABLATION=<row>``, numbers as numbers, booleans as
``1/0/true/false/yes/no``, ``OPTIONS=key=value,key=value`` (values as Python literals).
"""
from __future__ import annotations

import ast
import collections.abc
import contextlib
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Dict, Iterator, Mapping, Optional, Tuple, Type, TypeVar

ENV_ROOT = "DEQFUSION_"
# DEQFusion options an adapter sets itself (from the upstream's shapes and the ablation field)
RESERVED_OPTIONS = ("dim", "num_modalities", "ablation")
ABLATION_ROWS = ("weighted_sum", "no_deq", "modality_deq", "fusion_deq", "full", "no_gate")
# What each row keeps of DEQ fusion (deqfusion.config.ABLATIONS), for the reproduce tables.
ABLATION_TITLES = {
    "weighted_sum": "weighted sum (no f_θ, no f_fuse, no DEQ)",
    "no_deq": "f_θ + f_fuse, one pass (no DEQ)",
    "modality_deq": "f_θ + DEQ (fused = Σ z_i)",
    "fusion_deq": "f_fuse + DEQ (f_θ = identity)",
    "full": "DEQ fusion (full)",
    "no_gate": "DEQ fusion without gate (purify removed)",
}

S = TypeVar("S", bound="FusionSettings")
_active: Dict[str, FusionSettings] = {}


class SettingsError(ValueError):
    """A setting has a bad name or value; the message names the fix."""


def parse_value(text: str) -> Any:
    """A Python literal where the text is one (``30``, ``1e-4``, ``True``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(text: str, what: str = "options") -> Dict[str, Any]:
    """``key=value,key=value`` -> dict (values through parse_value)."""
    out: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise SettingsError(f"{what}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def check_fusion_options(options: Mapping[str, Any]) -> None:
    """Option names must be DEQFusion's (FusionConfig decides; a misspelling names the right one)."""
    from deqfusion.config import option_names, unknown_option_message

    valid = option_names()
    for key in options:
        if key in RESERVED_OPTIONS:
            fix = "use the ablation setting" if key == "ablation" else "the adapter sets it from the upstream's shapes"
            raise SettingsError(f"DEQFusion option {key!r} cannot be set here: {fix}")
        if key not in valid:
            raise SettingsError(unknown_option_message(key, valid))


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"expected a boolean (1/0/true/false/yes/no), got {text!r}")


@dataclass(frozen=True)
class FusionSettings:
    """What a patched upstream builds: its own fusion (``fusion=<baseline>``) or DEQ fusion.

    Subclasses set ``upstream`` (the env prefix is ``DEQFUSION_<UPSTREAM>_``), ``baseline`` (the name
    of the upstream's own fusion), ``default_options`` (DEQFusion options from the paper for this
    upstream) and may add fields or change defaults (e.g. ``jac_weight``).
    """

    upstream: ClassVar[str] = ""
    baseline: ClassVar[str] = "concat"
    default_options: ClassVar[Mapping[str, Any]] = {}

    fusion: str = "deq"
    ablation: str = "full"
    jac_weight: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = ("deq", self.baseline)
        if self.fusion not in choices:
            raise SettingsError(f"{self.upstream} fusion must be one of {choices}, got {self.fusion!r}")
        if self.ablation not in ABLATION_ROWS:
            raise SettingsError(f"unknown ablation {self.ablation!r}; choose one of {list(ABLATION_ROWS)}")
        if not isinstance(self.jac_weight, (int, float)) or self.jac_weight < 0:
            raise SettingsError(f"jac_weight must be a number >= 0, got {self.jac_weight!r}")
        if not isinstance(self.options, Mapping):
            raise SettingsError(f"options must be a mapping of DEQFusion options, got {type(self.options).__name__}")
        check_fusion_options(self.options)
        object.__setattr__(self, "options", dict(self.options))

    # -- what the adapter builds ---------------------------------------------------------------
    @property
    def is_deq(self) -> bool:
        return self.fusion == "deq"

    def fusion_kwargs(self) -> Dict[str, Any]:
        """DEQFusion keyword options: this upstream's defaults, then ``options``, then the ablation row."""
        kw = dict(self.default_options)
        kw.update(self.options)
        kw["ablation"] = self.ablation
        return kw

    def describe(self) -> str:
        if not self.is_deq:
            return f"{self.baseline} ({self.upstream} baseline)"
        kw = self.fusion_kwargs()
        kw.pop("ablation")
        extra = [f"{k}={v}" for k, v in sorted(kw.items())]
        extra += [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                  if f.name not in ("fusion", "ablation", "jac_weight", "options")]
        return f"DEQ fusion [{self.ablation}], jac weight {self.jac_weight:g}" + (f", {', '.join(extra)}" if extra else "")

    # -- where settings come from --------------------------------------------------------------
    @classmethod
    def env_prefix(cls) -> str:
        return f"{ENV_ROOT}{cls.upstream.upper()}_"

    @classmethod
    def env_names(cls) -> Tuple[str, ...]:
        return tuple(cls.env_prefix() + f.name.upper() for f in fields(cls))

    @classmethod
    def from_env(cls: Type[S], environ: Optional[Mapping[str, str]] = None) -> S:
        """Settings from ``DEQFUSION_<UPSTREAM>_*``; unset variables keep the defaults."""
        env = os.environ if environ is None else environ
        prefix, known = cls.env_prefix(), set(cls.env_names())
        stray = sorted(k for k in env if k.startswith(prefix) and k not in known)
        if stray:
            raise SettingsError(f"unknown setting {stray[0]}; {cls.upstream} reads {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        kw: Dict[str, Any] = {}
        for f in fields(cls):
            name = prefix + f.name.upper()
            text = env.get(name, "").strip()
            if not text:
                continue
            try:
                kw[f.name] = _convert(text, hints[f.name], name)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"{name}={text!r}: {err}") from None
        return cls(**kw)

    @classmethod
    def current(cls: Type[S]) -> S:
        """The settings in force: the innermost ``configure`` block, else the environment."""
        active = _active.get(cls.upstream)
        return active if active is not None else cls.from_env()  # type: ignore[return-value]

    @classmethod
    @contextlib.contextmanager
    def configure(cls: Type[S], settings: Optional[S] = None, **changes: Any) -> Iterator[S]:
        """Within the block, models built by this upstream's patched code use these settings."""
        chosen = settings if settings is not None else cls()
        if not isinstance(chosen, cls):
            raise SettingsError(f"configure() of {cls.__name__} got {type(chosen).__name__}")
        if changes:
            chosen = replace(chosen, **changes)
        previous = _active.get(cls.upstream)
        _active[cls.upstream] = chosen
        try:
            yield chosen
        finally:
            if previous is None:
                _active.pop(cls.upstream, None)
            else:
                _active[cls.upstream] = previous

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(text: str, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if text.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        return _parse_bool(text)
    if hint in (int, float):
        return hint(text)
    if hint is str:
        return text
    if origin in (dict, collections.abc.Mapping) or hint in (dict, Mapping):
        return parse_options(text, name)
    if origin is tuple:
        return tuple(parse_value(p.strip()) for p in text.split(",") if p.strip())
    return parse_value(text)
