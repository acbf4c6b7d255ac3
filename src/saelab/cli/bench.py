"""`saelab bench`: the SynthSAEBench protocol in one command."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from saelab.bench.protocols import PROTOCOLS
from saelab.cli import app
from saelab.cli.common import arch_names_help, out, parse_count, parse_l0_values, print_json
from saelab.errors import ConfigError, TrainingInterrupted
from saelab.metrics.names import RUN_METRICS, TRANSCODER_RUN_METRICS

RESULT_KEYS = ["arch", "l0_target", "seed", "samples", *RUN_METRICS, "compute_precision", "wall_seconds"]


@app.command()
def bench(
    protocol: str = typer.Option(
        "mini",
        help="Benchmark protocol: "
        + "; ".join(f"{p.name}: {p.data}, width {p.width}, {p.samples:,} samples" for p in PROTOCOLS.values())
        + ".",
    ),
    arch: list[str] | None = typer.Option(
        None,
        help="Architectures: registry names, module:Class, or ARCH:key=value variants (batchtopk:skip=false: a plain "
        f"transcoder in a skip protocol); default matryoshka. {arch_names_help()}",
    ),
    ablate: list[str] | None = typer.Option(
        None, help="Also train ARCH with each of its components removed in turn (e.g. recipe)."
    ),
    l0: list[str] | None = typer.Option(None, help="Target L0s (default: the protocol's natural L0)."),
    seeds: int = typer.Option(1, help="Number of seeds (0..seeds-1)."),
    seed_start: int = typer.Option(0, help="First seed."),
    samples: str | None = typer.Option(
        None,
        help="Override the protocol's training samples (e.g. for convergence "
        "checks); such runs are their own leaderboard entry.",
    ),
    tier: str | None = typer.Option(
        None, help="A named budget of the protocol instead of --samples (mini: quick = 1.5M, full = 6M)."
    ),
    eval_samples: str | None = typer.Option(None, help="Override the protocol's evaluation samples."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    precision: str | None = typer.Option(
        None, help="auto, fp32 or bf16 (default: the protocol's, auto: bf16 where the device has bf16 units)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the newest interrupted bench with these same options from its checkpoints; "
        "finished seeds are not retrained.",
    ),
    checkpoint_minutes: float = typer.Option(
        10.0, help="Minutes between checkpoints of each seed (what --resume continues from)."
    ),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every this many steps (0: by time only)."),
    jobs: int = typer.Option(1, help="Seeds trained at once in worker processes (CPU: e.g. 2 on 2 cores)."),
    store: Path | None = typer.Option(None, help="Results store (default runs/results.sqlite or $SAELAB_STORE)."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not record results."),
    estimate: bool | None = typer.Option(
        None,
        "--estimate/--no-estimate",
        help="Time a few training steps first and print the estimated wall time (default: on, off with --json).",
    ),
    out_dir: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for run folders."),
    json_output: bool = typer.Option(
        False, "--json", help="One JSON line per result (kind run), then one per (arch, L0) (kind summary)."
    ),
) -> None:
    """Train and score every (arch, L0, seed); print mean ± sd per (arch, L0); record all results."""
    from saelab.bench.paths import check_writable_dir
    from saelab.bench.protocols import get_protocol
    from saelab.bench.runner import (
        BenchRequest,
        find_resumable_stamp,
        finished_runs,
        reserve_run_dirs,
        run_bench,
        summarize,
        variant_check_dims,
    )
    from saelab.bench.variants import resolve_archs
    from saelab.bench.workers import Terminated, sigterm_as_interrupt
    from saelab.saes.registry import ablation_names
    from saelab.training.progress import progress_seconds

    # Every option is checked before the store or a run folder is touched.
    proto = get_protocol(protocol)
    from saelab.cli.common import check_seed
    from saelab.devices import resolve_device

    device = resolve_device(device)
    check_seed(seed_start, "seed_start")
    if seeds <= 0:
        raise ConfigError("seeds", seeds, "must be a positive integer")
    if jobs < 1:
        raise ConfigError("jobs", jobs, "must be a positive integer")
    arch = list(arch or ([] if ablate else ["matryoshka"]))
    for base in ablate or []:
        arch += [name for name in [base, *ablation_names(base)] if name not in arch]
    l0s = parse_l0_values(l0) if l0 else [float(proto.natural_l0)]
    if samples is not None and tier is not None:
        raise ConfigError("tier", tier, "give --tier or --samples, not both")
    budget = parse_count(samples) if samples is not None else proto.tier_samples(tier) if tier is not None else None
    request = BenchRequest(
        protocol=proto,
        archs=arch,
        l0s=l0s,
        seeds=list(range(seed_start, seed_start + seeds)),
        device=device,
        samples=budget,
        out_dir=out_dir,
        eval_samples=parse_count(eval_samples, "eval_samples") if eval_samples is not None else None,
        precision=precision,
        checkpoint_minutes=checkpoint_minutes,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    # Registry names, user classes and `ARCH:key=value` variants (e.g. `batchtopk:skip=false`, a plain transcoder
    # in a skip protocol), each override dry-run on the protocol's shapes before anything trains.
    request.archs, request.variants = resolve_archs(arch, **variant_check_dims(request))
    request.run_config(request.seeds[0])  # every training setting checked before anything is written
    progress_seconds()  # and $SAELAB_PROGRESS_SECONDS
    check_writable_dir(out_dir, "out")
    results_store = None
    if not no_store:
        from saelab.bench.store import ResultsStore, default_store_path

        results_store = ResultsStore(store or default_store_path())
    stamp = find_resumable_stamp(request) if resume else reserve_run_dirs(request)
    collected: list[dict] = []

    from saelab.runs.warnings import budget_of_run, run_warnings

    budget = budget_of_run(request.run_config(request.seeds[0]), proto)  # the same for every seed
    warned: list[str] = []

    def emit(record):
        collected.append(record)
        warnings = run_warnings(record, budget)  # runs/warnings.py: L0 off target, many dead latents
        warned.extend(f"seed {record.get('seed')}: {w}" for w in warnings)
        if json_output:
            keys = RESULT_KEYS + (list(TRANSCODER_RUN_METRICS) if record.get("fvu") is not None else [])
            print_json({"kind": "run", **{k: record.get(k) for k in keys}, "warnings": warnings})

    try:
        with sigterm_as_interrupt():
            if not json_output:
                _announce(request, jobs)
            if estimate if estimate is not None else not (json_output or resume):
                from saelab.bench.compare import estimate_wall_time
                from saelab.cli.common import estimate_printer

                estimate_printer(json_output, None)(estimate_wall_time(request, jobs))
            records = run_bench(
                request,
                store=results_store,
                progress=not json_output,
                on_result=emit,
                jobs=jobs,
                stamp=stamp,
            )
    except (KeyboardInterrupt, TrainingInterrupted) as err:
        # Ctrl-C or SIGTERM: as KeyboardInterrupt (Terminated for SIGTERM), or as TrainingInterrupted when it came
        # during training in this process (the trainer saved a checkpoint first). Workers are already stopped.
        sigterm = isinstance(err, Terminated) or getattr(err, "exit_code", None) == 128 + signal.SIGTERM
        name = "SIGTERM" if sigterm else "SIGINT"
        done = finished_runs(request, stamp, results_store, collected)
        total = len(arch) * len(l0s) * seeds
        where = f"stored in {results_store.path}" if results_store is not None else "not stored (--no-store)"
        for a, l0_value, seed in done:  # plain prints: rich would wrap long lines
            print(f"finished: {a} L0 {l0_value:g} seed {seed}", file=sys.stderr, flush=True)
        # The one-line `error: ...` of every saelab error, with exit status 130 (SIGINT) or 143 (SIGTERM).
        raise TrainingInterrupted(
            f"bench interrupted by {name}: {len(done)} of {total} (arch, L0, seed) runs "
            f"finished ({where}); the others did not finish",
            exit_code=128 + (signal.SIGTERM if sigterm else signal.SIGINT),
        ) from None
    summary = summarize(records)
    if json_output:
        for row in summary:
            print_json(row)
        return
    from saelab.bench.export import format_budget
    from saelab.bench.leaderboard import format_interval

    table = Table(
        title=f"saelab bench --protocol {protocol}: mean ± sd over {seeds} seed(s), 95% interval of the mean F1"
    )
    from saelab.bench.leaderboard import METRIC_LABELS, board_metrics

    middle = board_metrics(summary)[2:-2]  # between MCC and L0: uniqueness and EV, or a transcoder's FVU, skip err, ...
    labels = [{"uniqueness": "uniqueness"}.get(m, METRIC_LABELS[m]) for m in middle]
    for header in ("arch", "L0 target", "samples", "F1", "F1 95% CI", "MCC", *labels, "L0", "dead"):
        table.add_column(header, justify="right")

    def cell(row: dict, key: str, fmt: str = "{:.3f}") -> str:
        if row.get(f"{key}_mean") is None:
            return "—"
        return f"{fmt.format(row[key + '_mean'])} ± {fmt.format(row[key + '_sd'] or 0.0)}"

    for row in summary:
        table.add_row(
            escape(row["arch"]),
            f"{row['l0_target']:g}",
            format_budget(row.get("samples"), proto.samples),
            cell(row, "f1"),
            format_interval(row, "f1", 3) or "—",
            cell(row, "mcc"),
            *(cell(row, m) for m in middle),
            cell(row, "l0", "{:.1f}"),
            cell(row, "dead_latents", "{:.0f}"),
        )
    out.print(table)
    if results_store is not None:
        out.print(f"results recorded in {results_store.path}; see `saelab results leaderboard`")
    for line in warned:
        print(f"warning: {line}", file=sys.stderr, flush=True)  # plain print: one unwrapped line each


def _announce(request, jobs: int) -> None:
    """What is about to run, on stderr, before any training: with --jobs each worker prints its own progress lines."""
    from saelab.training.progress import interval_text, progress_seconds

    n_seeds = len(request.seeds)
    steps = request.run_config(request.seeds[0]).train_config().total_steps
    n_saes = len(request.archs) * len(request.l0s)
    line = f"bench: {n_seeds} seed(s) × {n_saes} SAE(s), {steps:,} training steps per seed"
    if jobs > 1 and n_seeds > 1:
        every = interval_text(progress_seconds())
        line += f", in {min(jobs, n_seeds)} worker processes; each prints `seed N: step ...` {every}"
    print(line, file=sys.stderr, flush=True)  # plain print: rich would wrap it
