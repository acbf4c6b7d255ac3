"""`saelab compare BASE VARIANT...`: is each variant better than the base, paired by seed?"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from saelab.cli import app
from saelab.cli.common import arch_names_help, estimate_printer, out, print_json
from saelab.errors import ConfigError, TrainingInterrupted

VARIANT_HELP = (
    "Architecture names, user classes (file.py:Class or module:Class) or option overrides "
    "ARCH:key=value[,key=value...] (values are JSON, else strings)."
)


def parse_budget(samples: str | None, tier: str | None) -> int | None:
    """--samples as a count; --tier and --samples together are refused (CompareRequest resolves the tier)."""
    from saelab.cli.common import parse_count

    if samples is not None and tier is not None:
        raise ConfigError("tier", tier, "give --tier or --samples, not both")
    return parse_count(samples) if samples is not None else None


def parse_single_l0(l0: list[str] | None) -> float | None:
    from saelab.cli.common import parse_l0_values

    if not l0:
        return None
    values = parse_l0_values(l0)
    if len(values) > 1:
        raise ConfigError("l0", " ".join(l0), "compare takes one target L0 (run one compare per L0)")
    return values[0]


def _signed(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 4) -> str:
    return "—" if not ci else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def comparison_table(rows: list[dict[str, Any]], title: str, metrics: list[str]) -> Table:
    """Δ ± se, 95% CI and verdict per metric, one row per variant."""
    table = Table(title=title)
    table.add_column("variant", no_wrap=True)
    table.add_column("seeds", justify="right")
    for m in metrics:
        label = {"f1": "F1", "mcc": "MCC"}.get(m, m)
        table.add_column(f"Δ{label} ± se", justify="right")
        table.add_column("95% CI", justify="right")
        table.add_column("verdict", justify="left")
        if m == "f1":
            table.add_column("resolves ±", justify="right")
    colours = {"better": "green", "worse": "red"}
    for row in rows:
        cells = [escape(row["variant"]), str(row["n_seeds"])]
        for m in metrics:
            sfx = "" if m == "f1" else f"_{m}"
            delta, se = row.get(f"delta_{m}"), row.get(f"se_{m}")
            cells.append("—" if delta is None else _signed(delta) + (f" ± {se:.4f}" if se is not None else ""))
            cells.append(_ci(row.get(f"ci95_{m}")))
            verdict = row.get(f"verdict{sfx}", "unresolved")
            colour = colours.get(verdict)
            cells.append(f"[{colour}]{verdict}[/{colour}]" if colour else verdict)
            if m == "f1":
                res = row.get("resolvable_f1")
                cells.append("—" if res is None else f"{res:.4f}")
        table.add_row(*cells)
    return table


def print_comparisons(
    rows: list[dict[str, Any]], outcome: Any, metrics: list[str], *, max_minutes: float | None, store_path: Path | None
) -> None:
    first = rows[0] if rows else {}
    budget = f"{first.get('samples'):,} samples" + (f" (tier {first['tier']})" if first.get("tier") else "")
    title = (
        f"{first.get('protocol')} · L0 {first.get('l0_target'):g} · {budget}: variant − "
        f"{escape(outcome.base.text)}, paired by seed"
    )
    out.print(comparison_table(rows, title, metrics))
    out.print(
        "verdict: better/worse when the 95% interval of the paired difference excludes 0; 'resolves ±' is "
        "the interval's half-width, the smallest difference these seeds can tell from noise."
    )
    if outcome.partial:
        why = f"--max-minutes {max_minutes:g} was spent" if max_minutes is not None else "seeds did not finish"
        out.print(
            f"[yellow]partial: {outcome.seeds_finished} of {outcome.seeds_requested} seeds finished ({why})[/yellow]"
        )
    out.print(
        f"wall time {outcome.wall_seconds / 60:.1f} min"
        + (f"; runs recorded in {store_path}" if store_path is not None else "")
    )


def interrupted(err: BaseException, what: str) -> TrainingInterrupted:
    """The one-line error for Ctrl-C / SIGTERM (exit 130 / 143)."""
    from saelab.bench.workers import Terminated

    sigterm = isinstance(err, Terminated) or getattr(err, "exit_code", None) == 128 + signal.SIGTERM
    name = "SIGTERM" if sigterm else "SIGINT"
    return TrainingInterrupted(
        f"{what} interrupted by {name}; runs that finished are in the store",
        exit_code=128 + (signal.SIGTERM if sigterm else signal.SIGINT),
    )


def open_store(store: Path | None, no_store: bool):
    if no_store:
        return None
    from saelab.bench.store import ResultsStore, default_store_path

    return ResultsStore(store or default_store_path())


@app.command()
def compare(
    base: str = typer.Argument(
        ..., metavar="BASE", help=f"The base architecture every variant is compared against. {arch_names_help()}"
    ),
    variants: list[str] = typer.Argument(..., metavar="VARIANT", help=VARIANT_HELP),
    protocol: str = typer.Option("mini", help="Benchmark protocol (mini, 16k, ...)."),
    samples: str | None = typer.Option(None, help="Training samples per SAE (default: the protocol's)."),
    tier: str | None = typer.Option(None, help="A named budget instead of --samples (mini: quick = 1.5M, full = 6M)."),
    seeds: int = typer.Option(3, help="Number of seeds (seed-start .. seed-start+seeds-1)."),
    seed_start: int = typer.Option(0, help="First seed."),
    l0: list[str] | None = typer.Option(None, help="Target L0 (default: the protocol's natural L0)."),
    jobs: int = typer.Option(1, help="Seeds trained at once in worker processes."),
    metric: list[str] = typer.Option(
        [], help="Also compare this metric (F1 and MCC always), e.g. --metric explained_variance."
    ),
    max_minutes: float | None = typer.Option(
        None, help="Wall-time budget: stop training when it is spent and report the seeds that finished (partial)."
    ),
    eval_samples: str | None = typer.Option(None, help="Evaluation samples (default: the protocol's)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    store: Path | None = typer.Option(None, help="Results store (default runs/results.sqlite or $SAELAB_STORE)."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not record the runs."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for run folders."),
    estimate: bool = typer.Option(
        True, "--estimate/--no-estimate", help="Time a few training steps first and print the estimated wall time."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="JSON lines: the estimate (kind estimate), then one per variant (kind comparison)."
    ),
) -> None:
    """Train BASE and each VARIANT together on every seed's stream; report ΔF1 and ΔMCC paired by seed with
    standard error, 95% interval and a verdict (better / worse / unresolved)."""
    from saelab.bench.compare import CompareRequest, resolve_arms, run_compare
    from saelab.bench.paths import check_writable_dir
    from saelab.bench.protocols import get_protocol
    from saelab.bench.workers import sigterm_as_interrupt
    from saelab.cli.common import check_seed, parse_count
    from saelab.devices import resolve_device

    proto = get_protocol(protocol)
    budget = parse_budget(samples, tier)
    check_seed(seed_start, "seed_start")
    if seeds <= 0:
        raise ConfigError("seeds", seeds, "must be a positive integer")
    request = CompareRequest(
        protocol=proto,
        base=base,
        variants=list(variants),
        seeds=list(range(seed_start, seed_start + seeds)),
        l0=parse_single_l0(l0),
        samples=budget,
        tier=tier,
        eval_samples=parse_count(eval_samples, "eval_samples") if eval_samples is not None else None,
        metrics=list(metric),
        device=resolve_device(device),
        out_dir=out_dir,
        jobs=jobs,
        max_minutes=max_minutes,
    )
    resolved = resolve_arms(request)  # unknown names and bad overrides fail before anything is written
    check_writable_dir(out_dir, "out")
    results_store = open_store(store, no_store)

    on_estimate = estimate_printer(json_output, max_minutes)

    try:
        with sigterm_as_interrupt():
            outcome = run_compare(
                request,
                store=results_store,
                estimate=estimate,
                on_estimate=on_estimate,
                progress=not json_output,  # workers print plain lines labelled by seed
                resolved=resolved,
            )
    except (KeyboardInterrupt, TrainingInterrupted) as err:
        raise interrupted(err, "compare") from None
    if json_output:
        for row in outcome.rows:
            print_json(row)
        return
    print_comparisons(
        outcome.rows,
        outcome,
        request.metrics,
        max_minutes=max_minutes,
        store_path=None if results_store is None else results_store.path,
    )
    sys.stdout.flush()
