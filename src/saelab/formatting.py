"""Number formatting shared by the CLI, the results store and the report."""

from __future__ import annotations


def mean_sd_parts(mean: float, sd: float | None, digits: int) -> tuple[str, str]:
    """('0.8590', '± 0.0010'): the mean and its spread, apart, for layouts that set the spread in
    smaller type (the report). A missing spread (a single seed) prints as 0."""
    return f"{mean:.{digits}f}", f"± {(sd or 0.0):.{digits}f}"


def format_mean_sd(mean: float, sd: float | None, digits: int) -> str:
    """'0.8590 ± 0.0010': a mean and its spread (standard deviation or standard error) to the same
    number of decimals. A missing spread (a single seed) prints as 0."""
    return " ".join(mean_sd_parts(mean, sd, digits))


def format_duration(seconds: float) -> str:
    """'45 s', '12.5 min', '1.6 h': a wall time to the precision a person plans by."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
