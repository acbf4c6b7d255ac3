"""`saelab report RUN_DIR|RESULTS_DB --out report.html`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from saelab.cli import app
from saelab.cli.common import TRUST_CODE_OPTION, USER_ARCHS_OPTION, check_seed, console, out, parse_count, print_json
from saelab.errors import ConfigError


@app.command("report")
def report_command(
    source: Path = typer.Argument(..., help="A run folder (run.json + saes/) or a results store (.sqlite)."),
    out_path: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (atomically)."),
    eval_samples: str = typer.Option("50k", help="Fresh ground-truth samples for the per-feature sections."),
    max_saes: int = typer.Option(
        4, help="At most this many SAEs (the best of each architecture) get per-feature plots."
    ),
    seed: int = typer.Option(0, help="Seed of the re-evaluation samples and the heatmap's latent sample."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line: path, sections shown and omitted, partial."),
    arch: list[str] = USER_ARCHS_OPTION,
    trust_code: bool = TRUST_CODE_OPTION,
) -> None:
    """One self-contained HTML report (plots embedded, no network) of a run or a results store."""
    from saelab.bench.paths import check_output_file
    from saelab.devices import resolve_device
    from saelab.report import build_report
    from saelab.saes.registry import import_user_architectures

    check_seed(seed)
    device = resolve_device(device)
    n_eval = parse_count(eval_samples, "eval_samples")
    if max_saes < 0:
        raise ConfigError("max_saes", max_saes, "must be ≥ 0")
    check_output_file(out_path, "out")
    import_user_architectures(arch)
    result = build_report(
        source,
        out_path,
        eval_samples=n_eval,
        seed=seed,
        device=device,
        max_saes=max_saes,
        command="saelab " + " ".join(sys.argv[1:]),
        trust_code=trust_code,
    )
    if json_output:
        print_json(
            {
                "path": str(result.path),
                "shown": result.shown,
                "omitted": result.omitted,
                "partial": result.partial,
                "images": result.images,
            }
        )
        return
    out.print(f"wrote {result.path} ({result.images} figures; sections: {', '.join(result.shown)})")
    for sid, why in result.omitted.items():
        console.print(f"[dim]omitted {sid}: {escape(why)}[/dim]", highlight=False)
    if result.partial:
        console.print(
            f"[yellow]partial:[/yellow] {len(result.partial)} issue(s) listed at the top of the report", highlight=False
        )
