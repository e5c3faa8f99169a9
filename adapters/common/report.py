"""Table writers every ``deqfusion reproduce <upstream>`` shares: mean ± std over seeds, the paper's
numbers beside ours, and the label that keeps a number from generated data from looking like a result."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

GENERATED = "generated data, not a result"


def mean_std(values: Iterable[float]) -> Tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) over the finite values; std is NaN for fewer than two."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan"), n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return mean, math.sqrt(var), n


def fmt_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """'81.89 ± 1.71'; a single run has no spread, so its std is left out, not printed as ± 0.00."""
    if mean != mean:
        return "–"
    if std != std:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def plural(n: int, word: str, suffix: str = "s") -> str:
    """'1 seed', '10 seeds'."""
    return f"{n} {word}{'' if n == 1 else suffix}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def provenance_note(generated: bool, what: Optional[str] = None) -> str:
    """The line every table from generated data carries (and real-data tables name their data)."""
    if generated:
        return f"**{GENERATED.capitalize()}**: every number below comes from generated data in the upstream's " \
               f"on-disk format{f' ({what})' if what else ''}; it shows the pipeline runs, not how the method performs."
    return f"Real data{f': {what}' if what else ''}."
