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
