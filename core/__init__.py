"""deqfusion: Deep Equilibrium Multimodal Fusion (Ni et al., 2023) -- one tested core.

    from deqfusion import DEQFusion
    fused, jac_loss, stats = DEQFusion(dim=512, num_modalities=2)([x_text, x_image])

Names are imported lazily, so that `deqfusion.upstream` (the patch tool) starts without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEQFusion": "layer", "FusionOutput": "layer",
    "FusionConfig": "config", "ABLATIONS": "config", "ConfigError": "config",
    "SolverStats": "solvers", "Status": "solvers", "anderson": "solvers", "broyden": "solvers",
    "fixed_point_iter": "solvers", "solve": "solvers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deqfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
