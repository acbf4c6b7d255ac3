"""The top-level commands as `saelab --help` lists them, known without importing the modules that define them.

Importing every command module pulls in torch, scipy and matplotlib: seconds of CPU before anything is
printed. `saelab --help` and a bare `saelab` only list the commands, so they print this table instead
(`saelab.cli.main`); a command, or a command's own --help, imports the real modules. Each entry is the
first paragraph of the command's help as typer lists it, in typer's order (commands, then command groups).
tests/cli/test_newcomer.py checks that the listing is exactly what the registered commands give: a new
command goes here too.
"""

from __future__ import annotations

import os

import typer

COMMANDS: tuple[tuple[str, str], ...] = (
    ("bench", "Train and score every (arch, L0, seed); print mean ± sd per (arch, L0); record all results."),
    ("cache", "Run the LM over the corpus up to the hooked layer and store its activations as shards."),
    (
        "compare",
        "Train BASE and each VARIANT together on every seed's stream; report ΔF1 and ΔMCC paired by seed with\n"
        "standard error, 95% interval and a verdict (better / worse / unresolved).",
    ),
    (
        "convert",
        "Convert a pretrained SAE to a SAELens-format folder (written atomically: OUT appears complete or not at all).",
    ),
    (
        "l0",
        "Train one SAE per L0 on a shared stream (or score a pretrained family with --saes), plot s_n^dec and decoder "
        "|cos| against L0, recommend an L0.",
    ),
    (
        "diagnose",
        "Absorption, hedging, recall-vs-frequency and L0 metrics for every SAE of a run; prints a summary, writes plots.",
    ),
    ("report", "One self-contained HTML report (plots embedded, no network) of a run or a results store."),
    ("train", "Train SAEs on a data stream, evaluate them (ground truth, or the spliced LM) and save a run folder."),
    ("eval", "Score any saved SAE (or transcoder, on a transcoder world) against a synthetic model's ground truth."),
    ("theory", "Closed-form results: superposition capacity, absorption."),
    ("research", "A research workspace: init, try ideas against a base, read the log, rerun."),
    ("results", "List the runs in a results store; sub-commands rank, export and plot them."),
    (
        "synth",
        "Ground-truth synthetic activations (SynthSAEBench-style models) and transcoder worlds (tc-*). "
        "Presets: sbw-toy, synth-16k, synth-mini, tc-16k, tc-mini; or pass a folder saved by saelab or SAELens.",
    ),
)


def lists_commands(args: list[str]) -> bool:
    """True for `saelab` and `saelab --help`: the command line asks only for the list of commands."""
    if os.environ.get("_SAELAB_COMPLETE"):  # shell completion needs every command's options
        return False
    return all(arg == "--help" for arg in args)


def command_listing(app: typer.Typer) -> typer.Typer:
    """A typer app with `app`'s name and help whose commands are placeholders carrying the listed help."""
    listing = typer.Typer(
        name=app.info.name,
        help=app.info.help,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )

    def placeholder() -> None:  # never runs: only --help reaches this app
        raise AssertionError("the command listing runs no command")

    for name, help_text in COMMANDS:
        listing.command(name, help=help_text)(placeholder)
    return listing
