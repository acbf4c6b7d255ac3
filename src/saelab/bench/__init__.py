"""Benchmark protocols, the results store, the leaderboard statistics, exports and plots."""

from saelab.bench.export import export_leaderboard, export_runs, parse_export_format
from saelab.bench.leaderboard import format_summary, leaderboard_rows, sort_leaderboard, summary
from saelab.bench.paired import PairedDelta, mean_interval, paired_delta
from saelab.bench.plots import plot_f1_vs_l0
from saelab.bench.reference import PUBLISHED_16K, REFERENCE_CITATION, REFERENCE_PROTOCOL, reference_rows
from saelab.bench.store import ResultsStore, default_store_path

__all__ = [
    "PUBLISHED_16K",
    "REFERENCE_CITATION",
    "REFERENCE_PROTOCOL",
    "PairedDelta",
    "ResultsStore",
    "default_store_path",
    "export_leaderboard",
    "export_runs",
    "format_summary",
    "leaderboard_rows",
    "mean_interval",
    "paired_delta",
    "parse_export_format",
    "plot_f1_vs_l0",
    "reference_rows",
    "sort_leaderboard",
    "summary",
]
