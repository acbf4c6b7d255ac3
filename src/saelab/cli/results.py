"""`saelab results`: list, rank, export and plot the runs in a results store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from saelab.cli import app
from saelab.cli.common import console, out, print_json, results_table
from saelab.errors import ConfigError
from saelab.metrics.names import RUN_IDENTITY, SHORT_METRICS

results_app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="List the runs in a results store; sub-commands rank, export and plot them.",
)
app.add_typer(results_app, name="results")

STORE_HELP = "Results store (default: $SAELAB_STORE, else runs/results.sqlite)."
RUN_JSON_KEYS = [*RUN_IDENTITY, "status", *SHORT_METRICS, "wall_seconds"]
RUN_COLUMNS = [
    ("run_id", "run", "{}"),
    ("protocol", "protocol", "{}"),
    ("arch", "arch", "{}"),
    ("l0_target", "L0 target", "{:g}"),
    ("seed", "seed", "{}"),
    ("status", "status", "{}"),
    ("f1", "F1", "{:.4f}"),
    ("mcc", "MCC", "{:.4f}"),
    ("explained_variance", "EV", "{:.4f}"),
    ("l0", "L0", "{:.2f}"),
    ("dead_latents", "dead", "{}"),
    ("wall_seconds", "wall s", "{:.1f}"),
    ("started", "started (UTC)", "{}"),
]
BOARD_COLUMNS = [
    ("source", "source", "{}"),
    ("protocol", "protocol", "{}"),
    ("arch", "arch", "{}"),
    ("l0_target", "L0 target", "{:g}"),
    ("budget", "samples", "{}"),
    ("compute_precision", "precision", "{}"),
    ("n_seeds", "seeds", "{}"),
    ("f1", "F1", "{}"),
    ("f1_ci95", "F1 95% CI", "{}"),
    ("mcc", "MCC", "{}"),
    ("uniqueness", "uniqueness", "{}"),
    ("explained_variance", "EV", "{}"),
    ("l0", "L0", "{}"),
    ("dead_latents", "dead", "{}"),
    ("f1_best", "best F1", "{:.4f}"),
]


def run_columns(metrics: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """RUN_COLUMNS with the metric columns of `metrics` (board_metrics of the rows; the runs list shows no
    uniqueness): SAE runs keep RUN_COLUMNS, transcoder runs show FVU, skip err and computing."""
    tc = {"fvu": "FVU", "skip_rel_error": "skip err", "computing_features_recovered": "computing"}
    known = {c[0]: c for c in RUN_COLUMNS} | {k: (k, label, "{:.4f}") for k, label in tc.items()}
    head = [c for c in RUN_COLUMNS if c[0] in ("run_id", "protocol", "arch", "l0_target", "seed", "status")]
    tail = [known["wall_seconds"], known["started"]]
    return [*head, *(known[m] for m in metrics if m != "uniqueness"), *tail]


# Transcoder metrics' columns in the leaderboard (bench.leaderboard.board_metrics says when they show).
TRANSCODER_BOARD_COLUMNS = {
    "fvu": ("fvu", "FVU", "{}"),
    "skip_rel_error": ("skip_rel_error", "skip err", "{}"),
    "computing_features_recovered": ("computing_features_recovered", "computing", "{}"),
}


def board_columns(metrics: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """BOARD_COLUMNS with `metrics` (bench.leaderboard.board_metrics) as its metric columns, in that order."""
    known = {c[0]: c for c in BOARD_COLUMNS} | TRANSCODER_BOARD_COLUMNS
    head = [
        c
        for c in BOARD_COLUMNS
        if c[0] in ("source", "protocol", "arch", "l0_target", "budget", "compute_precision", "n_seeds")
    ]
    body = [c for m in metrics for c in ([known[m], known["f1_ci95"]] if m == "f1" else [known[m]])]
    return [*head, *body, known["f1_best"]]


def _open(store: Path | None, ctx: typer.Context | None = None):
    """Open an existing store (read commands never create one); --store given before the sub-command also counts."""
    from saelab.bench.store import ResultsStore, default_store_path

    if store is None and ctx is not None and isinstance(ctx.obj, dict):
        store = ctx.obj.get("store")
    return ResultsStore(store if store is not None else default_store_path(), create=False)


def _l0_filter(values: list[str]) -> list[float] | None:
    from saelab.cli.common import parse_l0_values

    return parse_l0_values(values) or None


@results_app.callback()
def results(
    ctx: typer.Context,
    store: Path | None = typer.Option(None, help=STORE_HELP),
    protocol: str | None = typer.Option(None, help="Only runs of this protocol (mini, 16k, custom, ...)."),
    arch: list[str] = typer.Option([], help="Only these architectures."),
    l0: list[str] = typer.Option([], help="Only these target L0s, e.g. --l0 20 25."),
    status: str | None = typer.Option(None, help="running, complete, failed or incomplete (killed part-way)."),
    since: str | None = typer.Option(None, help="Only runs started at or after this ISO time (UTC if no zone)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per run."),
) -> None:
    """List the runs in a results store (killed runs show as incomplete)."""
    ctx.obj = {"store": store}
    if ctx.invoked_subcommand is not None:
        return
    from saelab.bench.leaderboard import TRANSCODER_METRICS, board_metrics, is_transcoder_row, metric_value

    rows = _open(store).runs(protocol=protocol, arch=arch or None, l0=_l0_filter(l0), status=status, since=since)
    for row in rows:  # a transcoder's own metrics live in its metrics dict, not in columns of the store
        if is_transcoder_row(row):
            row.update({m: metric_value(row, m) for m in TRANSCODER_METRICS})
    if json_output:
        for row in rows:
            keys = RUN_JSON_KEYS + (list(TRANSCODER_METRICS) if is_transcoder_row(row) else [])
            print_json({k: row.get(k) for k in keys})
        return
    if not rows:
        console.print("no runs match")
        return
    for row in rows:
        row["started"] = (row.get("started_at") or "")[:19].replace("T", " ")
        row["arch"] = escape(str(row["arch"]))  # `recipe[ista_steps=0]` is a name, not rich markup
    out.print(results_table(f"runs ({len(rows)})", rows, run_columns(board_metrics(rows))))


def _pm(row: dict[str, Any], metric: str) -> str | None:
    mean, sd = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
    if mean is None:
        return None
    digits = 2 if metric in ("l0", "dead_latents") else 4
    return f"{mean:.{digits}f} ± {(sd or 0.0):.{digits}f}"


@results_app.command()
def leaderboard(
    ctx: typer.Context,
    store: Path | None = typer.Option(None, help=STORE_HELP),
    protocol: str | None = typer.Option(None, help="Only this protocol."),
    reference: bool = typer.Option(
        True, "--reference/--no-reference", help="Show the published SynthSAEBench-16k baselines beside saelab's rows."
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per leaderboard row."),
) -> None:
    """Mean ± sd and the 95% interval of the mean over seeds per (arch, L0, budget) for complete runs, best mean
    F1 first. A run on another budget than its protocol's, or in another precision (bf16/fp32), is its own row."""
    rows = _open(store, ctx).leaderboard(protocol, include_reference=reference)
    if json_output:
        for row in rows:
            print_json(row)
        return
    if not rows:
        console.print("no complete runs yet")
        return
    from saelab.bench.export import format_budget
    from saelab.bench.leaderboard import board_metrics, format_interval

    metrics = board_metrics(rows)  # SAE rows keep BOARD_COLUMNS; transcoder rows show FVU, skip err, computing
    display = [
        {
            **row,
            "arch": escape(str(row["arch"])),
            **{m: _pm(row, m) for m in metrics},
            "budget": format_budget(row.get("samples"), row.get("protocol_samples")),
            "f1_ci95": None if row["source"] == "published" else format_interval(row, "f1"),
        }
        for row in rows
    ]
    protocols = {r["protocol"] for r in rows}
    precisions = {r.get("compute_precision") for r in rows if r["source"] == "saelab"}
    one = {"protocol": len(protocols) == 1, "compute_precision": len(precisions) <= 1}  # one value: in the title
    columns = [c for c in board_columns(metrics) if not one.get(c[0], False)]
    title = ", ".join(sorted(protocols))
    if len(precisions) == 1 and None not in precisions:
        title += f"; {next(iter(precisions))}"
    table = results_table(f"leaderboard ({title})", display, columns)
    for column in table.columns:
        if column.header in ("arch", "source"):
            column.no_wrap = True  # keep names whole; the mean ± sd cells may wrap on a narrow terminal
    for i, row in enumerate(rows):
        if row["source"] == "published":  # reference rows are not ours: set them apart
            table.rows[i].style = "dim italic"
    out.print(table)
    if any(r["source"] == "published" for r in rows):
        out.print("source=published: SynthSAEBench paper / SAELens docs (16k protocol), not run by saelab.")


@results_app.command()
def export(
    ctx: typer.Context,
    fmt: str = typer.Option(..., "--format", help="csv, json or md."),
    out_path: Path = typer.Option(..., "--out", help="File to write (atomically; an existing file is replaced)."),
    board: bool = typer.Option(False, "--leaderboard", help="Export the leaderboard instead of the runs."),
    store: Path | None = typer.Option(None, help=STORE_HELP),
    protocol: str | None = typer.Option(None, help="Only this protocol."),
    arch: list[str] = typer.Option([], help="Only these architectures (runs export)."),
    l0: list[str] = typer.Option([], help="Only these target L0s (runs export)."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Include published rows (leaderboard)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line: the file written, its format and rows."),
) -> None:
    """Write the complete runs (or the leaderboard) as CSV, JSON or Markdown."""
    from saelab.bench.export import export_leaderboard, export_runs, parse_export_format
    from saelab.bench.paths import check_output_file

    fmt = parse_export_format(fmt)  # fail on a bad format or --out before reading anything
    check_output_file(out_path)
    results_store = _open(store, ctx)
    if board:
        rows = results_store.leaderboard(protocol, include_reference=reference)
        export_leaderboard(rows, out_path, fmt)
    else:
        rows = results_store.runs(protocol=protocol, arch=arch or None, l0=_l0_filter(l0), status="complete")
        export_runs(rows, out_path, fmt)
    what = "leaderboard" if board else "runs"
    if json_output:
        print_json({"kind": "export", "path": str(out_path), "format": fmt, "what": what, "rows": len(rows)})
        return
    if not rows:
        console.print("warning: nothing matched; wrote an empty export")
    console.print(f"wrote {len(rows)} {'leaderboard rows' if board else 'runs'} to {out_path}")


@results_app.command()
def plot(
    ctx: typer.Context,
    out_path: Path = typer.Option(..., "--out", help="PNG file to write (an existing file is replaced)."),
    store: Path | None = typer.Option(None, help=STORE_HELP),
    protocol: str | None = typer.Option(None, help="Only this protocol."),
    reference: bool = typer.Option(False, "--reference", help="Add the published baselines as hollow markers."),
    title: str | None = typer.Option(None, help="Figure title."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line: the file written and what it plots."),
) -> None:
    """F1 vs L0 and MCC vs L0, one line per architecture (mean ± sd over seeds)."""
    from saelab.bench.paths import check_output_file
    from saelab.bench.plots import plot_f1_vs_l0

    if out_path.suffix.lower() != ".png":
        raise ConfigError("out", str(out_path), "must end in .png")
    check_output_file(out_path)
    rows = _open(store, ctx).leaderboard(protocol, include_reference=reference)
    if not any(r["source"] == "saelab" for r in rows) and not reference:
        raise ConfigError("protocol", protocol, "has no complete runs to plot")
    plot_f1_vs_l0(rows, out_path, title=title)
    if json_output:
        ours = [r for r in rows if r["source"] == "saelab"]
        print_json(
            {
                "kind": "plot",
                "path": str(out_path),
                "archs": sorted({str(r["arch"]) for r in ours}),
                "points": len(ours),
                "reference_points": len(rows) - len(ours),
            }
        )
        return
    console.print(f"wrote {out_path}")
