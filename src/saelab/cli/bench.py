"""`saelab bench`: the SynthSAEBench protocol in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from saelab.cli import app
from saelab.cli.common import out, parse_count, parse_l0_values, print_json
from saelab.errors import ConfigError

RESULT_KEYS = ["arch", "l0_target", "seed", "f1", "precision", "recall", "mcc", "uniqueness", "explained_variance",
               "l0", "dead_latents", "wall_seconds"]


@app.command()
def bench(
    protocol: str = typer.Option("mini", help="Benchmark protocol: mini (2-core CPU) or 16k (published, GPU)."),
    arch: Optional[list[str]] = typer.Option(None, help="Architectures (registry names or module:Class); default matryoshka."),
    ablate: Optional[list[str]] = typer.Option(None, help="Also train ARCH with each of its components removed in turn (e.g. recipe)."),
    l0: Optional[list[str]] = typer.Option(None, help="Target L0s (default: the protocol's natural L0)."),
    seeds: int = typer.Option(1, help="Number of seeds (0..seeds-1)."),
    seed_start: int = typer.Option(0, help="First seed."),
    samples: Optional[str] = typer.Option(None, help="Override the protocol's training samples (e.g. for convergence checks)."),
    device: str = typer.Option("cpu"),
    jobs: int = typer.Option(1, help="Seeds trained at once in worker processes (CPU: e.g. 2 on 2 cores)."),
    store: Optional[Path] = typer.Option(None, help="Results store (default runs/results.sqlite or $SAELAB_STORE)."),
    no_store: bool = typer.Option(False, help="Do not record results."),
    out_dir: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for run folders."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per result, then one per (arch, L0)."),
) -> None:
    """Train and score every (arch, L0, seed); print mean ± sd per (arch, L0); record all results."""
    from saelab.bench.protocols import get_protocol
    from saelab.bench.runner import BenchRequest, run_bench, summarize
    from saelab.saes.base import ablation_names, get_sae_class

    proto = get_protocol(protocol)
    if seeds <= 0:
        raise ConfigError("seeds", seeds, "must be a positive integer")
    arch = list(arch or ([] if ablate else ["matryoshka"]))
    for base in ablate or []:
        arch += [name for name in [base, *ablation_names(base)] if name not in arch]
    for name in arch:
        get_sae_class(name)
    l0s = parse_l0_values(l0) if l0 else [float(proto.natural_l0)]
    request = BenchRequest(
        protocol=proto,
        archs=arch,
        l0s=l0s,
        seeds=list(range(seed_start, seed_start + seeds)),
        device=device,
        samples=parse_count(samples) if samples else None,
        out_dir=out_dir,
    )
    results_store = None
    if not no_store:
        from saelab.bench.store import ResultsStore, default_store_path

        results_store = ResultsStore(store or default_store_path())

    def emit(record):
        if json_output:
            print_json({k: record.get(k) for k in RESULT_KEYS})

    records = run_bench(request, store=results_store, progress=not json_output and jobs == 1, on_result=emit,
                        jobs=jobs)
    summary = summarize(records)
    if json_output:
        for row in summary:
            print_json(row)
        return
    table = Table(title=f"saelab bench --protocol {protocol}: mean ± sd over {seeds} seed(s)")
    for header in ("arch", "L0 target", "F1", "MCC", "uniqueness", "EV", "L0", "dead"):
        table.add_column(header, justify="right")
    for row in summary:
        def cell(key: str, fmt: str = "{:.3f}") -> str:
            if f"{key}_mean" not in row:
                return "—"
            return f"{fmt.format(row[key + '_mean'])} ± {fmt.format(row[key + '_sd'])}"

        table.add_row(row["arch"], f"{row['l0_target']:g}", cell("f1"), cell("mcc"), cell("uniqueness"),
                      cell("explained_variance"), cell("l0", "{:.1f}"), cell("dead_latents", "{:.0f}"))
    out.print(table)
    if results_store is not None:
        out.print(f"results recorded in {results_store.path}; see `saelab results leaderboard`")
