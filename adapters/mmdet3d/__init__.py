"""DEQ fusion for mmdetection3d's ImVoteNet (pip package ``mmdet3d==1.4.0``): a registry plugin, no source edit.

mmdet3d's ``ImVoteNet.loss()``/``predict()`` concatenate the 256 PointNet++ seed features and the 256
lifted image-vote features inline (``torch.cat(..., dim=1)``) and hand the (B, 512, 1024) result to the
joint tower's ``VoteHead`` as ``feat_dict['seed_features']``.  The plugin does not touch that code:
the project config (``configs/imvotenet_deq_stage2_8xb16_sunrgbd-3d.py``) inherits mmdet3d's own stage-2
config and swaps the three towers' head type for ``DEQFusionVoteHead`` (``head.py``), a registered
subclass of ``VoteHead`` whose ``_extract_input`` splits the joint tower's seed features back into
their two halves and fuses them with DEQ fusion before voting, and whose ``loss`` adds
``loss_deq_jac`` (mmengine sums every ``loss*`` key into the total).

``custom_imports`` in the config imports :mod:`.plugin`, which registers the head and, where mmcv has
no kernel for a tensor's device, installs the project's CPU stand-ins (:mod:`.cpu_ops`).

This module imports neither mmdet3d nor torch: the main environment (and ``apply``) can read the
settings, the pins and the instructions without the heavy stack.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from ..common.settings import FusionSettings

__all__ = [
    "Settings", "configure", "current_settings", "PINS", "CONFIG_NAME", "BASE_CONFIG", "config_path",
    "installed_versions", "version_problems", "plugin_instructions", "PAPER_NOTE",
]

CONFIG_NAME = "imvotenet_deq_stage2_8xb16_sunrgbd-3d.py"
BASE_CONFIG = "imvotenet/imvotenet_stage2_8xb16_sunrgbd-3d.py"  # in mmdet3d's .mim/configs (the wheel ships it)
PAPER_NOTE = ("The DEQ paper reports ImVoteNet 61.9 / 45.6 -> + DEQ 62.7 / 46.4 mAP@0.25 / @0.5 on SUN RGB-D; "
              "its authors released no ImVoteNet code, so this fusion site and these defaults are the project's design.")

# What the plugin was built and tested against (mmdet3d/__init__.py asserts mmcv >=2.0.0rc4,<2.2.0,
# mmengine >=0.8.0,<1.0.0, mmdet >=3.0.0rc5,<3.4.0; its requirements/mminstall.txt says mmdet <3.3.0).
PINS: Dict[str, str] = {
    "mmdet3d": "==1.4.0",
    "mmcv": "==2.1.0",
    "mmengine": ">=0.8.0,<1.0.0",
    "mmdet": ">=3.0.0,<3.3.0",
    "numpy": "<2",
    "setuptools": "<81",  # mmengine's config loader imports pkg_resources for the mmdet3d:: base; 81 removed it
}
# mmcv 2.x has no binary wheels on PyPI: the full build needs torch first and these flags (~14 min on 2 cores).
MMCV_HINT = 'pip install "setuptools<81" && pip install --no-build-isolation "mmcv==2.1.0"'
INSTALL_HINT = f'{MMCV_HINT} && pip install ".[mmdet3d]" (from the deqfusion checkout)'



@dataclass(frozen=True)
class Settings(FusionSettings):
    """DEQ fusion in the joint tower. The config's ``deq_fusion`` dict overrides these fields.

    ``jac_weight`` is not from the paper (no ImVoteNet code was released). It weights the Jacobian term
    inside the joint tower, and ImVoteNet's tower weight (0.4) multiplies it like every joint loss, so the
    default 2.5 puts ``1.0 * jac`` in the total: the original-code route's default (docs/imvotenet.md),
    whose per-tower losses are on the same scale as mmdet3d's.
    """

    upstream: ClassVar[str] = "mmdet3d"
    baseline: ClassVar[str] = "concat"
    default_options: ClassVar[Mapping[str, Any]] = {}

    jac_weight: float = 2.5

    def describe(self) -> str:
        return "concatenation (upstream ImVoteNet)" if not self.is_deq else super().describe()


configure = Settings.configure
current_settings = Settings.current


def config_path() -> Path:
    """The project config shipped in this package (package data)."""
    path = Path(__file__).resolve().parent / "configs" / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall deqfusion (pip install '.[mmdet3d]'), "
                                "whose package data carries adapters/mmdet3d/configs/")
    return path


# -- versions -------------------------------------------------------------------------------------

def _release(version: str) -> Tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"unparseable version {version!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def satisfies(version: str, spec: str) -> bool:
    """``version`` against a comma-separated spec of ``==, !=, >=, <=, >, <`` on release numbers."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, want_text = re.match(r"(==|!=|>=|<=|>|<)\s*(.+)", clause).groups()
        want = _release(want_text)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def installed_versions() -> Dict[str, Optional[str]]:
    """Installed distribution versions (None = not installed); ``mmcv-lite`` is reported as such."""
    from importlib import metadata

    def get(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    found: Dict[str, Optional[str]] = {name: get(name) for name in PINS}
    found["mmcv-lite"] = get("mmcv-lite")
    return found


def _route(versions: Mapping[str, Optional[str]]) -> str:
    return "full" if versions.get("mmcv") else ("light" if versions.get("mmcv-lite") else "none")


def version_problems(versions: Optional[Mapping[str, Optional[str]]] = None) -> List[str]:
    """What is missing or off-pin, one line each with its fix (empty = ready to train)."""
    v = dict(installed_versions() if versions is None else versions)
    problems: List[str] = []
    for name, spec in PINS.items():
        have = v.get(name)
        fix = MMCV_HINT if name == "mmcv" else f'pip install "{name}{spec}"'
        if name == "mmcv" and not have and v.get("mmcv-lite"):
            problems.append(f"mmcv-lite {v['mmcv-lite']} has no compiled ops (RoIAlign/NMS kernels, PointNet++ CUDA "
                            f"kernels): enough for the CPU tests with deqfusion's stand-ins, not for training; "
                            f"install the full mmcv{spec}: pip uninstall mmcv-lite && {fix}")
        elif not have:
            problems.append(f"{name} is not installed; the plugin needs {name}{spec}: {fix}")
        elif not satisfies(have, spec):
            problems.append(f"{name} {have} is installed; the plugin needs {name}{spec}: {fix}")
    return problems


def _train_script() -> str:
    """mmdet3d's tools/train.py as the wheel ships it (mmdet3d/.mim/tools/train.py), else the repo-relative path."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mmdet3d")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        script = Path(spec.origin).parent / ".mim" / "tools" / "train.py"
        if script.is_file():
            return str(script)
    return "tools/train.py"


def plugin_instructions(versions: Optional[Mapping[str, Optional[str]]] = None) -> List[str]:
    """The lines ``apply mmdet3d`` prints: the installed versions against the pins, the config, the commands."""
    v = dict(installed_versions() if versions is None else versions)
    problems = version_problems(v)
    config = config_path()
    shown = ", ".join(f"{name} {v.get(name) or 'missing'}" for name in PINS if name != "mmcv")
    mmcv = f"mmcv {v['mmcv']}" if v.get("mmcv") else (f"mmcv-lite {v['mmcv-lite']}" if v.get("mmcv-lite") else "mmcv missing")
    lines = [
        f"mmdet3d: registry plugin for the pip package mmdet3d{PINS['mmdet3d']}; nothing to clone or patch",
        f"installed: {mmcv}, {shown}" + ("" if problems else " (all match the pins)"),
    ]
    lines += [f"  problem: {p}" for p in problems]
    if problems:
        lines.append(f"  the whole stack, with torch installed first: {INSTALL_HINT}")
    script = _train_script()
    lines += [
        f"config: {config}",
        f"  inherits mmdet3d::{BASE_CONFIG}; custom_imports: deqfusion.adapters.mmdet3d.plugin",
        "data: data/sunrgbd/ under the working directory, prepared as mmdet3d's data/sunrgbd/README.md says "
        "(tools/create_data.py sunrgbd; ImVoteNet also needs sunrgbd_trainval/image); the stage-1 2D checkpoint "
        "comes from the config's load_from",
        f"train: python {script} {config}",
        f"   or: mim train mmdet3d {config}",
        f"   or, 8 GPUs: bash {Path(script).parent / 'dist_train.sh'} {config} 8",
        f"baseline (unchanged ImVoteNet): the same command with mmdet3d's configs/{BASE_CONFIG}",
        "check on CPU: python -m deqfusion.adapters.mmdet3d.runner (builds the model, runs loss + backward + predict)",
    ]
    return lines
