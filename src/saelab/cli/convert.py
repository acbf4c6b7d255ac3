"""`saelab convert IN --to saelens OUT`: any supported pretrained SAE format → a SAELens-format folder."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from saelab.cli import app
from saelab.cli.common import console, print_json
from saelab.errors import ConfigError

if TYPE_CHECKING:
    from saelab.saes.base import SAE

OUTPUT_FORMATS = ("saelens",)


@app.command("convert")
def convert_command(
    source: Path = typer.Argument(
        ...,
        metavar="IN",
        help="An SAE folder (or one of its files): SAELens, Gemma Scope, dictionary_learning, sparsify or Llama Scope.",
    ),
    out_dir: Path = typer.Argument(
        ..., metavar="OUT", help="The folder to write (cfg.json + sae_weights.safetensors)."
    ),
    to: str = typer.Option(..., "--to", help="Output format: saelens (saelab's own format; SAELens loads it)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds files."),
    json_output: bool = typer.Option(
        False, "--json", help="One JSON line: format, variant, architecture, d_in, d_sae, d_out, out, notes."
    ),
) -> None:
    """Convert a pretrained SAE to a SAELens-format folder (written atomically: OUT appears complete or not at all)."""
    from saelab.bench.paths import check_writable_dir
    from saelab.saes.formats import load_pretrained_with_info

    if to not in OUTPUT_FORMATS:
        raise ConfigError("to", to, f"must be one of {', '.join(OUTPUT_FORMATS)}")
    out_dir = out_dir.expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("out", str(out_dir), "is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError("out", str(out_dir), "already holds files; pass --force to replace it")
    if source.exists() and out_dir.exists() and _same_place(source, out_dir):
        raise ConfigError("out", str(out_dir), "is the input itself; write the converted SAE elsewhere")
    check_writable_dir(out_dir.absolute().parent, "out")  # the folder is renamed into place there
    sae, info = load_pretrained_with_info(source, device="cpu")
    source_meta: dict[str, Any] = {"format": info.format, "variant": info.variant, "path": str(info.path)}
    if info.notes:
        source_meta["notes"] = info.notes
    write_folder_atomically(sae, out_dir, {"converted_from": source_meta})
    result = {
        "format": info.format,
        "variant": info.variant,
        "architecture": sae.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "d_out": getattr(sae.cfg, "d_out", None),  # a transcoder's output width; null for an SAE
        "out": str(out_dir),
        "notes": info.notes,
    }
    if json_output:
        print_json(result)
        return
    console.print(
        f"{escape(str(source))}: {info.format} ({escape(info.variant)}) → {sae.architecture}, "
        f"d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}; wrote {escape(str(out_dir))}"
    )
    for note in info.notes:
        console.print(f"  note: {escape(note)}")


def write_folder_atomically(sae: SAE, out_dir: Path, metadata: dict[str, Any]) -> None:
    """Save into a hidden sibling folder, then rename it onto `out_dir` (an old `out_dir` is swapped out
    first and removed after), so a reader never sees a half-written or mixed folder."""
    from saelab.io import output_error
    from saelab.saes.saelens_format import save_sae

    parent = out_dir.parent
    token = secrets.token_hex(4)
    tmp = parent / f".{out_dir.name}.convert-{token}.tmp"
    old = parent / f".{out_dir.name}.old-{token}.tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        save_sae(sae, tmp, metadata=metadata)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(old, out_dir)  # put the original back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)  # onto a missing or empty folder
    except Exception as err:
        translated = output_error(err, out_dir)
        if translated is None or translated is err:
            raise
        raise translated from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _same_place(a: Path, b: Path) -> bool:
    try:
        a_dir = a if a.is_dir() else a.parent
        return a_dir.resolve() == b.resolve()
    except OSError:
        return False
