"""The one seed summary: runs grouped by (arch, L0, budget, precision), with mean, sd, standard error and 95% interval.

Used by the store's leaderboard (`saelab results leaderboard`, exports, plots, the report) and by the bench
command's own summary (`bench.runner.summarize`), so both always agree. A run trained on a budget other than
its protocol's is its own group: a quick 1.5M-sample run never averages with, or replaces, a 6M protocol run.
Likewise a bf16 run never averages with, or replaces, the fp32 run of the same seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from saelab.bench.paired import mean_interval
from saelab.bench.values import number

LEADERBOARD_METRICS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
# Summarised too where a group holds transcoder runs (protocol tc-mini); SAE rows keep their columns.
TRANSCODER_METRICS = ("fvu", "skip_rel_error", "computing_features_recovered")
# The columns a table of transcoder rows shows (EV is 1 − FVU there, so it is not repeated).
TRANSCODER_LEADERBOARD_METRICS = ("f1", "mcc", *TRANSCODER_METRICS, "l0", "dead_latents")
# Per metric, each summary holds these keys (e.g. f1_mean, f1_ci95_lo).
STAT_SUFFIXES = ("mean", "sd", "se", "ci95_lo", "ci95_hi")


def metric_value(row: Mapping[str, Any], name: str) -> float | None:
    """`name` from a store row (its column, else its metrics dict) or a plain record; None if absent or not finite."""
    value = row.get(name)
    if value is None and isinstance(row.get("metrics"), Mapping):
        value = row["metrics"].get(name)
    value = number(value)
    return None if value is None else float(value)


def _run_config(row: Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = row.get("config")
    if not isinstance(cfg, Mapping):
        return {}
    run = cfg.get("run")
    return run if isinstance(run, Mapping) else cfg


def budget_of(row: Mapping[str, Any]) -> int | None:
    """Training samples of a run: its run config's, else the record's own `samples`; None when unrecorded."""
    for value in (
        _run_config(row).get("samples"),
        row.get("samples"),
        (row.get("metrics") or {}).get("samples") if isinstance(row.get("metrics"), Mapping) else None,
    ):
        value = number(value)
        if value is not None:
            return int(value)
    return None


def precision_of(row: Mapping[str, Any]) -> str | None:
    """The precision a run's training steps computed in (`compute_precision`: fp32 or bf16); None for runs
    recorded before it was, whose precision the store cannot tell."""
    value = row.get("compute_precision")
    if value is None and isinstance(row.get("metrics"), Mapping):
        value = row["metrics"].get("compute_precision")
    return None if value is None else str(value)


def protocol_budget_of(row: Mapping[str, Any]) -> int | None:
    """The samples of the protocol the run was benched under (None for rows that do not record it)."""
    cfg = row.get("config")
    proto = cfg.get("protocol") if isinstance(cfg, Mapping) else None
    value = number(proto.get("samples")) if isinstance(proto, Mapping) else None
    if value is None:
        value = number(row.get("protocol_samples"))
    return None if value is None else int(value)


def with_transcoder_metrics(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str]) -> tuple[str, ...]:
    """`metrics`, plus TRANSCODER_METRICS when some row is a transcoder's (it has an `fvu`)."""
    transcoder = any(metric_value(r, "fvu") is not None for r in rows)
    return tuple(metrics) + tuple(m for m in TRANSCODER_METRICS if transcoder and m not in metrics)


def is_transcoder_row(row: Mapping[str, Any]) -> bool:
    """Whether a run record, store row or leaderboard row is a transcoder's: it has an FVU (of its target y)."""
    return metric_value(row, "fvu") is not None or number(row.get("fvu_mean")) is not None


def board_metrics(rows: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The metric columns of a table of leaderboard rows: LEADERBOARD_METRICS for SAE rows only (as ever),
    TRANSCODER_LEADERBOARD_METRICS for transcoder rows only, and both (SAE order, transcoder metrics before L0)
    where a table mixes them, e.g. tc-mini rows beside the published SAE reference rows."""
    kinds = {is_transcoder_row(r) for r in rows}
    if True not in kinds:
        return LEADERBOARD_METRICS
    if False not in kinds:
        return TRANSCODER_LEADERBOARD_METRICS
    return ("f1", "mcc", "uniqueness", "explained_variance", *TRANSCODER_METRICS, "l0", "dead_latents")


def summary(group: Iterable[Mapping[str, Any]], metrics: Sequence[str] = LEADERBOARD_METRICS) -> dict[str, Any]:
    """Statistics of each metric over a group of runs (e.g. the seeds of one (arch, L0, budget)).

    Rows may be store rows or plain metric dicts; a row with a status other than "complete" is skipped, so a
    killed or failed run can never leak into a summary. Returns n, f1_best and, per metric, <metric>_mean,
    _sd (sample sd; 0 for one value), _se and the 95% t-interval _ci95_lo/_ci95_hi (None for one value). A metric
    missing from every row gives None throughout.
    """
    rows = [r for r in group if r.get("status", "complete") == "complete"]
    result: dict[str, Any] = {"n": len(rows)}
    for name in metrics:
        values = [v for v in (metric_value(r, name) for r in rows) if v is not None]
        if not values:
            result.update({f"{name}_{s}": None for s in STAT_SUFFIXES})
            continue
        mean, se, ci = mean_interval(values)
        result[f"{name}_mean"] = mean
        result[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        result[f"{name}_se"] = se
        result[f"{name}_ci95_lo"], result[f"{name}_ci95_hi"] = ci if ci is not None else (None, None)
    f1 = [v for v in (metric_value(r, "f1") for r in rows) if v is not None]
    result["f1_best"] = max(f1) if f1 else None
    return result


def group_key(row: Mapping[str, Any]) -> tuple[str, float, int | None, str | None]:
    """(arch, L0 target, budget, compute precision): the runs of one group differ only by seed."""
    return str(row["arch"]), float(row["l0_target"]), budget_of(row), precision_of(row)


RunKey = tuple[str, str, float, int | None, str | None, int]  # (protocol, *group_key, seed)


def latest_complete_runs(runs: Iterable[Mapping[str, Any]]) -> dict[RunKey, Mapping[str, Any]]:
    """The latest complete run per (protocol, arch, L0, budget, precision, seed): `runs` oldest first, so a
    rerun of a seed replaces the earlier one. What the leaderboard, the report and the parity check count."""
    latest: dict[RunKey, Mapping[str, Any]] = {}
    for run in runs:
        if run.get("status", "complete") == "complete":
            latest[(str(run["protocol"]), *group_key(run), int(run["seed"]))] = run
    return latest


def summarize_seeds(
    records: Iterable[Mapping[str, Any]],
    metrics: Sequence[str] = LEADERBOARD_METRICS,
) -> list[dict[str, Any]]:
    """One row per (arch, L0, budget, precision) over the given records (one per seed), best mean F1 first."""
    groups: dict[tuple[str, float, int | None, str | None], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for (arch, l0, samples, precision), group in groups.items():
        stats = summary(group, metrics)
        rows.append(
            {
                "arch": arch,
                "l0_target": l0,
                "samples": samples,
                "compute_precision": precision,
                "n_seeds": stats.pop("n"),
                **stats,
            }
        )
    rows.sort(
        key=lambda r: (
            r.get("f1_mean") is None,
            -(r.get("f1_mean") or 0.0),
            r["arch"],
            r["l0_target"],
            r["samples"] or 0,
        )
    )
    return rows


def leaderboard_rows(
    complete_runs: Iterable[Mapping[str, Any]], protocol: str | None = None, *, include_reference: bool = True
) -> list[dict[str, Any]]:
    """One row per (protocol, arch, l0_target, samples, compute precision) over complete store runs, best mean F1
    first.

    Each row: source ("saelab" or "published"), protocol, arch, l0_target, samples (the training budget),
    protocol_samples and protocol_budget (whether it is the protocol's own budget), compute_precision (fp32,
    bf16, or None for runs recorded before precision was), n_seeds, the summary()
    statistics and f1_best. If a seed was run more than once at one budget, its latest complete run counts.
    Published reference rows (saelab.bench.reference) are added for protocol None or "16k" unless
    include_reference=False.
    """
    from saelab.bench.reference import reference_rows

    latest = latest_complete_runs(complete_runs)
    groups: dict[tuple[str, str, float, int | None, str | None], list[Mapping[str, Any]]] = {}
    for (proto, arch, l0, samples, precision, _), run in latest.items():
        groups.setdefault((proto, arch, l0, samples, precision), []).append(run)
    rows = []
    for (proto, arch, l0, samples, precision), group in groups.items():
        stats = summary(group, with_transcoder_metrics(group, LEADERBOARD_METRICS))
        budgets = {protocol_budget_of(r) for r in group} - {None}
        proto_samples = budgets.pop() if len(budgets) == 1 else None
        row: dict[str, Any] = {
            "source": "saelab",
            "protocol": proto,
            "arch": arch,
            "l0_target": l0,
            "samples": samples,
            "protocol_samples": proto_samples,
            "protocol_budget": None if proto_samples is None or samples is None else samples == proto_samples,
            "compute_precision": precision,
            "n_seeds": stats.pop("n"),
        }
        row.update(stats)
        row.update({"citation": None, "note": None})
        rows.append(row)
    if include_reference:
        rows.extend(reference_rows(protocol))
    return sort_leaderboard(rows)


def sort_leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple:
        f1 = row.get("f1_mean")
        return (f1 is None, -(f1 or 0.0), row["arch"], row["l0_target"], row.get("source", ""), row.get("samples") or 0)

    return sorted(rows, key=key)


METRIC_LABELS = {
    "f1": "F1",
    "mcc": "MCC",
    "uniqueness": "uniq",
    "explained_variance": "EV",
    "l0": "L0",
    "dead_latents": "dead",
    "fvu": "FVU",
    "skip_rel_error": "skip err",
    "computing_features_recovered": "computing",
}


def format_summary(stats: Mapping[str, Any], metrics: Sequence[str] = ("f1", "mcc", "explained_variance", "l0")) -> str:
    """'F1 0.7316 ± 0.0010 · MCC ... (n=5)' for the bench command's summary lines."""
    parts = []
    for name in metrics:
        mean, sd = stats.get(f"{name}_mean"), stats.get(f"{name}_sd")
        if mean is None:
            continue
        digits = 2 if name in ("l0", "dead_latents") else 4
        parts.append(f"{METRIC_LABELS.get(name, name)} {mean:.{digits}f} ± {(sd or 0.0):.{digits}f}")
    n = stats.get("n", stats.get("n_seeds"))
    return " · ".join(parts) + (f" (n={n})" if n is not None else "")


def format_interval(stats: Mapping[str, Any], metric: str, digits: int = 4) -> str | None:
    """'[0.7290, 0.7342]' (the 95% interval of the mean), '—' for one seed, None without the metric."""
    if stats.get(f"{metric}_mean") is None:
        return None
    lo, hi = stats.get(f"{metric}_ci95_lo"), stats.get(f"{metric}_ci95_hi")
    if lo is None or hi is None:
        return "—"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"
