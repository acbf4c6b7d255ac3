"""Benchmark protocols and the results store."""

from saelab.bench.reference import PUBLISHED_16K, REFERENCE_CITATION, REFERENCE_PROTOCOL, reference_rows
from saelab.bench.store import (
    ResultsStore,
    default_store_path,
    export_leaderboard,
    export_runs,
    format_summary,
    plot_f1_vs_l0,
    summary,
)

__all__ = [
    "PUBLISHED_16K",
    "REFERENCE_CITATION",
    "REFERENCE_PROTOCOL",
    "ResultsStore",
    "default_store_path",
    "export_leaderboard",
    "export_runs",
    "format_summary",
    "plot_f1_vs_l0",
    "reference_rows",
    "summary",
]
