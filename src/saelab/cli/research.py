"""`saelab research`: a workspace for trying SAE ideas against a base, with a log that survives kills."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from saelab.cli import app
from saelab.cli.common import console, estimate_printer, out, print_json
from saelab.errors import ConfigError, TrainingInterrupted

research_app = typer.Typer(
    no_args_is_help=True, help="A research workspace: init, try ideas against a base, read the log, rerun."
)
app.add_typer(research_app, name="research")

DIR_HELP = "The workspace folder (made by `saelab research init`)."


def _settings(
    ws: Any,
    base: str | None,
    tier: str | None,
    samples: str | None,
    seeds: int | None,
    l0: list[str] | None,
    eval_samples: str | None,
    jobs: int,
    max_minutes: float | None,
    metric: list[str],
    device: str,
):
    from saelab.cli.common import parse_count
    from saelab.cli.compare import parse_budget, parse_single_l0
    from saelab.devices import resolve_device
    from saelab.research.experiments import TrySettings

    budget = parse_budget(samples, tier)
    if budget is None and tier is None:
        tier = ws.settings.get("tier", "quick")
    if seeds is not None and seeds < 1:
        raise ConfigError("seeds", seeds, "must be a positive integer")
    n_seeds = seeds if seeds is not None else int(ws.settings.get("seeds", 3))
    level = parse_single_l0(l0)
    return TrySettings(
        protocol=ws.protocol(),
        base=base or ws.settings["base"],
        samples=budget,
        tier=tier,
        seeds=list(range(n_seeds)),
        l0=level if level is not None else float(ws.settings["l0"]),
        eval_samples=parse_count(eval_samples, "eval_samples") if eval_samples is not None else None,
        jobs=jobs,
        max_minutes=max_minutes,
        metrics=tuple(dict.fromkeys(["f1", "mcc", *metric])),
        device=resolve_device(device),
    )


def _delta(entry: dict[str, Any], metric: str = "f1") -> str:
    d, se = entry.get(f"delta_{metric}"), entry.get(f"se_{metric}")
    if d is None:
        return "—"
    return f"{d:+.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _budget(entry: dict[str, Any]) -> str:
    from saelab.bench.export import format_budget

    cfg = entry.get("config") or {}
    text = format_budget(cfg.get("samples"))
    return f"{cfg['tier']} ({text})" if cfg.get("tier") else text


def _entries_table(entries: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for header in ("id", "variant", "budget", "seeds", "ΔF1 ± se", "verdict", "ΔMCC ± se", "note"):
        table.add_column(header, overflow="fold")
    colours = {"better": "green", "worse": "red"}
    for e in entries:
        verdict = str(e.get("verdict"))
        if e.get("partial"):
            verdict += " (partial)"
        colour = colours.get(str(e.get("verdict")))
        seeds = f"{e.get('n_seeds')}/{e.get('seeds_requested', e.get('n_seeds'))}"
        note = escape(e.get("note") or "") + (f" (rerun of {e['rerun_of']})" if e.get("rerun_of") else "")
        table.add_row(
            str(e.get("id")),
            escape(str(e.get("variant"))),
            _budget(e),
            seeds,
            _delta(e),
            f"[{colour}]{verdict}[/{colour}]" if colour else verdict,
            _delta(e, "mcc"),
            note,
        )
    return table


def _interrupted(err: BaseException) -> TrainingInterrupted:
    from saelab.cli.compare import interrupted

    message = interrupted(err, "research")
    return TrainingInterrupted(f"{message}; nothing was added to the experiment log", exit_code=message.exit_code)


@research_app.command("init")
def init(
    directory: Path = typer.Argument(..., metavar="DIR", help="Folder for the workspace (created if missing)."),
    protocol: str = typer.Option("mini", help="Benchmark protocol of every experiment."),
    base: str = typer.Option("recipe", help="The architecture ideas are compared against."),
    seeds: int = typer.Option(3, help="Seeds per experiment (paired by seed)."),
    l0: list[str] | None = typer.Option(None, help="Target L0 (default: the protocol's natural L0)."),
    tier: str = typer.Option("quick", help="Default budget tier of `research try`."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line (kind workspace)."),
) -> None:
    """Write a workspace: TASK.md, ideas/template.py, a results store and an empty experiment log."""
    from saelab.cli.compare import parse_single_l0
    from saelab.research.workspace import init_workspace

    ws, written = init_workspace(
        directory, protocol=protocol, base=base, seeds=seeds, l0=parse_single_l0(l0), tier=tier
    )
    if json_output:
        print_json(
            {
                **ws.settings,
                "kind": "workspace",
                "dir": str(ws.root),
                "files": [str(p.relative_to(ws.root)) for p in written],
            }
        )
        return
    for path in written:
        out.print(f"wrote {path}")
    out.print(
        f"next: read {ws.root / 'TASK.md'}, then `cd {ws.root} && saelab research try "
        'ideas/template.py:Idea --note "the template as is"`'
    )


@research_app.command("try")
def try_(
    variants: list[str] = typer.Argument(
        ...,
        metavar="VARIANT",
        help="Ideas: file.py:Class, module:Class, a built-in name, or ARCH:key=value[,key=value...].",
    ),
    base: str | None = typer.Option(None, help="Base architecture (default: the workspace's)."),
    tier: str | None = typer.Option(None, help="Budget tier (default: the workspace's, quick)."),
    samples: str | None = typer.Option(None, help="Training samples instead of a tier."),
    seeds: int | None = typer.Option(None, help="Seeds (default: the workspace's)."),
    l0: list[str] | None = typer.Option(None, help="Target L0 (default: the workspace's)."),
    note: str | None = typer.Option(None, help="Why you tried it; kept in the log."),
    directory: Path = typer.Option(Path("."), "--dir", help=DIR_HELP),
    jobs: int = typer.Option(1, help="Seeds trained at once in worker processes."),
    max_minutes: float | None = typer.Option(None, help="Wall-time budget; the result is marked partial if spent."),
    eval_samples: str | None = typer.Option(None, help="Evaluation samples (default: the protocol's)."),
    metric: list[str] = typer.Option([], help="Also compare this metric (F1 and MCC always)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate", help="Print the estimated wall time first."),
    json_output: bool = typer.Option(
        False, "--json", help="JSON lines: the estimate, then one per experiment (kind experiment)."
    ),
) -> None:
    """Compare each idea against the base (one run per seed, all ideas on the same streams) and append one
    experiment per idea to the workspace log."""
    from saelab.bench.workers import sigterm_as_interrupt
    from saelab.research.experiments import try_ideas
    from saelab.research.workspace import load_workspace

    ws = load_workspace(directory)
    settings = _settings(ws, base, tier, samples, seeds, l0, eval_samples, jobs, max_minutes, metric, device)
    try:
        with sigterm_as_interrupt():
            entries, outcome = try_ideas(
                ws,
                list(variants),
                settings,
                note=note,
                estimate=estimate,
                on_estimate=estimate_printer(json_output, max_minutes),
                progress=not json_output,
            )
    except (KeyboardInterrupt, TrainingInterrupted) as err:
        raise _interrupted(err) from None
    if json_output:
        for e in entries:
            print_json(e)
        return
    out.print(_entries_table(entries, f"logged in {ws.log.path}"))
    if outcome.partial:
        out.print(
            f"[yellow]partial: {outcome.seeds_finished} of {outcome.seeds_requested} seeds finished "
            "within --max-minutes[/yellow]"
        )


@research_app.command("log")
def log(
    directory: Path = typer.Argument(Path("."), metavar="DIR", help=DIR_HELP),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per experiment (kind experiment)."),
) -> None:
    """Every experiment in the workspace log, oldest first."""
    from saelab.research.experiments import confirmed
    from saelab.research.workspace import load_workspace

    ws = load_workspace(directory)
    read = ws.log.read()
    if read.bad_lines:
        console.print(f"warning: skipped unreadable line(s) {', '.join(map(str, read.bad_lines))} of {ws.log.path}")
    if json_output:
        for e in read.entries:
            print_json(e)
        return
    if not read.entries:
        console.print("no experiments yet: see TASK.md, then `saelab research try`")
        return
    out.print(_entries_table(read.entries, f"experiments in {ws.log.path} ({len(read.entries)})"))
    for c in confirmed(read.entries):
        out.print(
            f"[green]result[/green]: code {c['code_hash'][7:19]} is better at quick ({', '.join(c['quick'])}) "
            f"and confirmed at full ({', '.join(c['full'])})"
        )


@research_app.command("rerun")
def rerun_cmd(
    entry_id: str = typer.Argument(..., metavar="ID", help="An experiment id from `saelab research log`."),
    directory: Path = typer.Option(Path("."), "--dir", help=DIR_HELP),
    jobs: int | None = typer.Option(None, help="Seeds trained at once (default: as logged)."),
    max_minutes: float | None = typer.Option(None, help="Wall-time budget for the rerun."),
    note: str | None = typer.Option(None, help="Note for the new entry (default: 'rerun of ID')."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate", help="Print the estimated wall time first."),
    json_output: bool = typer.Option(False, "--json", help="JSON lines: the estimate, then one line (kind rerun)."),
) -> None:
    """Reproduce a logged experiment from the log alone (its saved code copy, config and seeds) and show the new
    deltas beside the logged ones; the rerun is appended to the log."""
    from saelab.bench.workers import sigterm_as_interrupt
    from saelab.devices import resolve_device
    from saelab.research.experiments import rerun
    from saelab.research.workspace import load_workspace

    ws = load_workspace(directory)
    try:
        with sigterm_as_interrupt():
            old, new = rerun(
                ws,
                entry_id,
                note=note,
                jobs=jobs,
                max_minutes=max_minutes,
                device=resolve_device(device),
                estimate=estimate,
                on_estimate=estimate_printer(json_output, max_minutes),
                progress=not json_output,
            )
    except (KeyboardInterrupt, TrainingInterrupted) as err:
        raise _interrupted(err) from None
    keys = (
        "delta_f1",
        "se_f1",
        "ci95_f1",
        "verdict",
        "delta_mcc",
        "se_mcc",
        "ci95_mcc",
        "verdict_mcc",
        "n_seeds",
        "partial",
    )
    if json_output:
        print_json(
            {
                "kind": "rerun",
                "id": entry_id,
                "new_id": new["id"],
                "variant": old.get("variant"),
                "code_hash": old.get("code_hash"),
                **{f"{k}_logged": old.get(k) for k in keys},
                **{k: new.get(k) for k in keys},
            }
        )
        return
    table = Table(title=f"{entry_id} ({escape(str(old.get('variant')))}) rerun as {new['id']}")
    for header in ("", "ΔF1 ± se", "F1 verdict", "ΔMCC ± se", "MCC verdict", "seeds"):
        table.add_column(header)
    for label, e in (("logged", old), ("rerun", new)):
        table.add_row(
            label, _delta(e), str(e.get("verdict")), _delta(e, "mcc"), str(e.get("verdict_mcc")), str(e.get("n_seeds"))
        )
    out.print(table)
