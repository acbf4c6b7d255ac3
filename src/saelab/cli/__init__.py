"""The `saelab` command. Each sub-command lives in its own module and is a thin wrapper over the library."""

from __future__ import annotations

import typer

from saelab.errors import SaelabError

app = typer.Typer(
    name="saelab",
    help="Train, evaluate and diagnose sparse autoencoders against known ground truth.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its commands to `app`; importing here keeps start-up to what is used.
    from saelab.cli import bench, diagnose, report, results, synth, train  # noqa: F401
    from saelab.cli import cache  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    import sys

    from saelab.cli.common import expand_multi_value_args

    _register()
    args = expand_multi_value_args(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="saelab")
    except SaelabError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
