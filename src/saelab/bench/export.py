"""Exports of store runs and leaderboard rows as CSV, JSON or Markdown, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab import __version__
from saelab.bench.leaderboard import (
    LEADERBOARD_METRICS,
    METRIC_LABELS,
    STAT_SUFFIXES,
    TRANSCODER_METRICS,
    board_metrics,
    is_transcoder_row,
)
from saelab.bench.values import clean, now_utc
from saelab.errors import ConfigError
from saelab.io import write_text_atomic
from saelab.metrics.names import GROUND_TRUTH, RECONSTRUCTION, RUN_IDENTITY, SUMMARY_METRICS, metric_keys

RUN_COLUMNS = [
    *RUN_IDENTITY,
    "status",
    *metric_keys(GROUND_TRUTH, RECONSTRUCTION),
    "samples_per_second",
    "wall_seconds",
    "started_at",
    "finished_at",
    "config_hash",
    "saelab_version",
    "commit",
    "hostname",
]
LEADERBOARD_COLUMNS = (
    ["source", "protocol", "arch", "l0_target", "samples", "protocol_samples", "compute_precision", "n_seeds"]
    + [f"{m}_{s}" for m in LEADERBOARD_METRICS for s in STAT_SUFFIXES]
    + ["f1_best", "citation", "note"]
)
EXPORT_FORMATS = ("csv", "json", "md")


def leaderboard_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """LEADERBOARD_COLUMNS, plus the transcoder metrics' statistics (before f1_best) when a row is a transcoder's;
    an export of SAE rows keeps exactly its columns."""
    if not any(is_transcoder_row(r) for r in rows):
        return list(LEADERBOARD_COLUMNS)
    at = LEADERBOARD_COLUMNS.index("f1_best")
    extra = [f"{m}_{s}" for m in TRANSCODER_METRICS for s in STAT_SUFFIXES]
    return [*LEADERBOARD_COLUMNS[:at], *extra, *LEADERBOARD_COLUMNS[at:]]


def _flat_run(run: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in run.items() if k not in ("config", "hardware", "metrics", "error", "pid")}
    for key, value in (run.get("metrics") or {}).items():
        if not isinstance(value, (dict, list)) and flat.get(key) is None:
            flat[key] = value
    return flat


def _check_complete(rows: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        if row.get("status") != "complete":
            raise ConfigError(
                "rows",
                f"run {row.get('run_id')}",
                f"is {row.get('status')}; only complete runs are exported as results",
            )


def _md_cell(value: Any, column: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if column == "l0_target":
            return f"{value:g}"
        two_decimals = column in ("l0", "dead_latents", "wall_seconds", "samples_per_second")
        return f"{value:.2f}" if two_decimals else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _csv(columns: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue()


def _json_document(kind: str, rows: list[Any]) -> str:
    from saelab.bench.store import SCHEMA_VERSION

    doc = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "saelab_version": __version__,
        "exported_at": now_utc(),
        "rows": clean(rows),
    }
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _write_output(path: str | os.PathLike[str], text: str) -> None:
    from saelab.bench.paths import check_output_file

    check_output_file(path)
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise ConfigError("out", str(path), f"cannot be written: {err.strerror or err}") from None


def parse_export_format(fmt: str) -> str:
    """'csv', 'json' or 'md' ('markdown' and a leading dot accepted); anything else is a ConfigError."""
    fmt = fmt.lower().lstrip(".")
    fmt = {"markdown": "md"}.get(fmt, fmt)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError("format", fmt, f"must be one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def export_runs(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], fmt: str) -> Path:
    """Write complete runs as csv (one column per metric), json (full rows with config and envelope) or md."""
    fmt, rows = parse_export_format(fmt), list(rows)
    _check_complete(rows)
    flat = [_flat_run(r) for r in rows]
    extra = [k for r in flat for k in r if k not in RUN_COLUMNS]
    columns = RUN_COLUMNS + list(dict.fromkeys(extra))
    if fmt == "csv":
        text = _csv(columns, flat)
    elif fmt == "json":
        text = _json_document("runs", [dict(r) for r in rows])
    else:
        md_columns = [*RUN_IDENTITY, *SUMMARY_METRICS, "wall_seconds", "commit"]
        text = _markdown(md_columns, [[_md_cell(r.get(c), c) for c in md_columns] for r in flat])
    _write_output(path, text)
    return Path(path)


def format_budget(samples: Any, protocol_samples: Any = None) -> str:
    """'6M', '1.5M' or '200k'; a budget other than the protocol's is marked '1.5M (protocol: 6M)'."""

    def short(n: Any) -> str:
        n = int(n)
        for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
            if n >= scale and n % (scale // 10) == 0:  # 1.5M, 200k; anything finer prints in full
                return f"{n / scale:g}{unit}"
        return f"{n:,}"

    if samples is None:
        return "—"
    text = short(samples)
    if protocol_samples is not None and int(protocol_samples) != int(samples):
        text += f" (protocol: {short(protocol_samples)})"
    return text


def export_leaderboard(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], fmt: str) -> Path:
    """Write leaderboard rows as csv/json (separate _mean/_sd/_se/_ci95 columns) or md (mean ± sd cells and the
    F1 95% interval)."""
    fmt, rows = parse_export_format(fmt), list(rows)
    if fmt == "csv":
        text = _csv(leaderboard_columns(rows), rows)
    elif fmt == "json":
        text = _json_document("leaderboard", [dict(r) for r in rows])
    else:
        from saelab.bench.leaderboard import format_interval

        metrics = board_metrics(rows)  # SAE rows: F1, MCC, uniqueness, EV, L0, dead; transcoders: FVU, skip err, ...
        headers = ["source", "protocol", "arch", "L0 target", "samples", "n seeds"]
        for m in metrics:
            label = "uniqueness" if m == "uniqueness" else METRIC_LABELS[m]  # spelled out, as it always was here
            headers += [label, "F1 95% CI"] if m == "f1" else [label]
        headers.append("best F1")
        body = []
        for r in rows:
            cells = [
                _md_cell(r.get("source"), "source"),
                _md_cell(r.get("protocol"), "protocol"),
                _md_cell(r.get("arch"), "arch"),
                _md_cell(r.get("l0_target"), "l0_target"),
                format_budget(r.get("samples"), r.get("protocol_samples")),
                _md_cell(r.get("n_seeds"), "n_seeds"),
            ]
            for m in metrics:
                mean, sd = r.get(f"{m}_mean"), r.get(f"{m}_sd")
                sd_text = _md_cell(float(sd or 0.0), m)
                cells.append("—" if mean is None else f"{_md_cell(float(mean), m)} ± {sd_text}")
                if m == "f1":
                    cells.append(format_interval(r, "f1") or "—")
            cells.append(_md_cell(r.get("f1_best"), "f1_best"))
            body.append(cells)
        text = _markdown(headers, body)
    _write_output(path, text)
    return Path(path)
