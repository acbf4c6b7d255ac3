"""Paired-by-seed comparisons: is a variant better than its base, or can these seeds not tell?

Each seed trains the base and the variant on the same data stream, so their difference on that
seed has the data's noise removed. Over n seeds the differences d_i give the mean Δ, its standard
error s/√n and a Student-t 95% interval Δ ± t(0.975, n−1)·s/√n. The verdict is `better` when the
interval lies wholly on the good side of 0, `worse` when wholly on the bad side, else
`unresolved`; the interval's half-width is the smallest difference these seeds can resolve.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["better", "worse", "unresolved"]


@dataclass(frozen=True)
class PairedDelta:
    metric: str
    delta: float
    se: float | None  # None with a single seed
    ci95: tuple[float, float] | None
    verdict: Verdict
    resolvable: float | None  # half-width of the 95% interval: smaller true differences stay unresolved
    n_seeds: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return d


def t_quantile_975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_delta(
    base: Mapping[int, float], variant: Mapping[int, float], metric: str = "f1", higher_is_better: bool = True
) -> PairedDelta:
    """Δ = variant − base over the seeds both have (see the module docstring)."""
    seeds = sorted(set(base) & set(variant))
    if not seeds:
        raise ValueError(f"no seed is shared by the base and the variant for {metric}")
    diffs = [float(variant[s]) - float(base[s]) for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDelta(metric, mean, None, None, "unresolved", None, n)
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile_975(n - 1) * se
    lo, hi = mean - half, mean + half
    good_lo, good_hi = (lo, hi) if higher_is_better else (-hi, -lo)
    verdict: Verdict = "better" if good_lo > 0 else "worse" if good_hi < 0 else "unresolved"
    return PairedDelta(metric, mean, se, (lo, hi), verdict, half, n)


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, tuple[float, float] | None]:
    """(mean, standard error, 95% t-interval) of independent values; None for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None, None
    se = statistics.stdev(values) / math.sqrt(n)
    half = t_quantile_975(n - 1) * se
    return mean, se, (mean - half, mean + half)
