"""The four fusion shapes of the paper's benchmarks (and small stand-ins for --quick)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Shape:
    name: str
    modalities: int
    dim: int
    batch: int
    spatial: Tuple[int, ...] = ()
    note: str = ""

    @property
    def state_numel(self) -> int:
        """Elements of the joint state (modality states + fused state) per sample."""
        n = self.dim
        for s in self.spatial:
            n *= s
        return (self.modalities + 1) * n

    def describe(self) -> str:
        sp = "x".join(str(s) for s in self.spatial)
        feat = f"{self.dim}x{sp}" if sp else str(self.dim)
        return f"{self.modalities} modalities, dim {feat}, batch {self.batch}"


SHAPES: Dict[str, Shape] = {
    "brca": Shape("brca", 3, 500, 612, note="BRCA-like (MM-Dynamics): full batch of 612"),
    "mmimdb": Shape("mmimdb", 2, 512, 128, note="MM-IMDB-like (MultiBench)"),
    "vqa": Shape("vqa", 2, 2048, 64, note="VQA-v2-like (MCAN/Mutan)"),
    "imvotenet": Shape("imvotenet", 2, 256, 8, (1024,), note="ImVoteNet-like: 256 channels x 1024 seeds"),
}

# --quick: same structure, small enough that the whole benchmark runs in seconds
QUICK: Dict[str, Shape] = {
    "brca": Shape("brca", 3, 40, 48, note="quick stand-in"),
    "mmimdb": Shape("mmimdb", 2, 32, 16, note="quick stand-in"),
    "vqa": Shape("vqa", 2, 64, 8, note="quick stand-in"),
    "imvotenet": Shape("imvotenet", 2, 16, 2, (32,), note="quick stand-in"),
}
