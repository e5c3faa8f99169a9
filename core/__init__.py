"""deqfusion: Deep Equilibrium Multimodal Fusion (Ni et al., 2023) -- one tested core.

    from deqfusion import DEQFusion
    out = DEQFusion(dim=512, num_modalities=2)([x_text, x_image])
    fused, jac_loss, stats = out
"""
from .solvers import SolverStats, Status, anderson, broyden, fixed_point_iter

__all__ = ["SolverStats", "Status", "anderson", "broyden", "fixed_point_iter"]
__version__ = "0.1.0"

try:  # the layer is importable once written; the solvers never depend on it
    from .config import ABLATIONS, FusionConfig  # noqa: F401
    from .layer import DEQFusion, FusionOutput  # noqa: F401

    __all__ += ["DEQFusion", "FusionOutput", "FusionConfig", "ABLATIONS"]
except ImportError as _err:  # pragma: no cover - only while the layer is absent
    if "deqfusion.config" not in str(_err) and "deqfusion.layer" not in str(_err) and "config" not in str(_err):
        raise
