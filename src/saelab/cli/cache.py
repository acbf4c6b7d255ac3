"""`saelab cache`: write a local LM's activations at one layer to a safetensors shard cache.

With `--out-hook-module` the cache is paired, for transcoders: each shard holds the input hook's
activations and the output hook's at the same tokens (e.g. an MLP's input and output:
`--hook-module transformer.h.1.mlp:input --out-hook-module transformer.h.1.mlp`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from saelab.cli import app
from saelab.cli.common import check_seed, out, parse_count, print_json


@app.command("cache")
def cache_command(
    model: str = typer.Option(..., help="Local Hugging Face causal-LM folder (nothing is downloaded)."),
    dataset: str = typer.Option(..., help="Text file, folder of text files, `datasets` folder or token file."),
    out_dir: Path = typer.Option(..., "--out", help="Cache folder (rerun the same command to continue it)."),
    layer: int | None = typer.Option(None, help="Hook the output of this transformer block (0-based)."),
    hook_module: str | None = typer.Option(
        None, help="Hook this named module's output instead of --layer; NAME:input hooks the module's input."
    ),
    out_hook_module: str | None = typer.Option(
        None,
        help="Transcoders: also store this hook's activations as targets (same syntax), e.g. "
        "--hook-module transformer.h.1.mlp:input --out-hook-module transformer.h.1.mlp.",
    ),
    tokens: str = typer.Option("1M", help="Activation rows (non-special tokens) to write, e.g. 1M."),
    shard_tokens: str = typer.Option("64k", help="Rows per shard."),
    text_column: str = typer.Option("text", help="Text column of a `datasets` folder."),
    context_size: int = typer.Option(128, help="Tokens per context fed to the LM."),
    model_batch_size: int = typer.Option(8, help="Contexts per LM forward pass."),
    buffer_size: int = typer.Option(16384, help="Rows in the shuffling buffer (shards are written shuffled)."),
    model_dtype: str = typer.Option("float32", help="dtype the LM runs in: float32, bfloat16 or float16."),
    dtype: str = typer.Option("float32", help="Stored dtype: float32, bfloat16 or float16."),
    seed: int = typer.Option(0, help="Seed of the shuffling buffer."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line with the manifest summary and timings."),
) -> None:
    """Run the LM over the corpus up to the hooked layer and store its activations as shards.

    With --out-hook-module each shard also stores the output hook's activations at the same tokens:
    (input, target) pairs for `saelab train --cache DIR --transcoder plain|skip`."""
    from saelab.activations.cache import write_cache
    from saelab.activations.sources import LMActivationSource, PairedRows
    from saelab.bench.paths import check_writable_dir
    from saelab.data import DataSpec, open_data
    from saelab.devices import resolve_device

    check_seed(seed)
    device = resolve_device(device)
    check_writable_dir(out_dir, "out")
    spec = DataSpec(
        model=model,
        layer=layer,
        hook_module=hook_module,
        out_hook_module=out_hook_module,
        dataset=dataset,
        text_column=text_column,
        context_size=context_size,
        model_batch_size=model_batch_size,
        buffer_size=buffer_size,
        model_dtype=model_dtype,
        prefetch=False,
    )
    total = parse_count(tokens, "tokens")
    shard_rows = parse_count(shard_tokens, "shard_tokens")
    source = open_data(spec, device=device, seed=seed).source
    lm_source = source.source if isinstance(source, PairedRows) else source
    assert isinstance(lm_source, LMActivationSource)  # a model and a dataset, no prefetch thread
    identity = lm_source.hooked.identity()
    extra = {"dataset": str(Path(dataset).expanduser().resolve()), "context_size": context_size}
    started = time.perf_counter()
    progress = None
    if not json_output:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        progress.start()
        task = progress.add_task("cache", total=total)
    try:
        manifest = write_cache(
            source,
            out_dir,
            total,
            identity,
            shard_tokens=shard_rows,
            dtype=dtype,
            extra=extra,
            on_shard=(lambda done, _: progress.update(task, completed=done)) if progress else None,
        )
    finally:
        if progress is not None:
            progress.stop()
    wall = time.perf_counter() - started
    summary = {
        "cache": str(out_dir),
        "rows": manifest["total_rows"],
        "shards": len(manifest["shards"]),
        "d_in": manifest["d_in"],
        **({"d_out": manifest["d_out"]} if manifest.get("d_out") is not None else {}),
        "dtype": manifest["dtype"],
        "wall_seconds": wall,
        "tokens_per_second": lm_source.tokens / max(wall, 1e-9),
        "tokenise_seconds": lm_source.timings["tokenise"],
        "forward_seconds": lm_source.timings["forward"],
        "write_seconds": manifest["write_seconds"],
    }
    if json_output:
        print_json(summary)
        return
    width = f"{summary['d_in']} → {summary['d_out']} (input → target)" if "d_out" in summary else summary["d_in"]
    out.print(
        f"{summary['rows']:,} rows of width {width} in {summary['shards']} shards at {out_dir} "
        f"({summary['tokens_per_second']:,.0f} tokens/s; tokenise {summary['tokenise_seconds']:.1f} s, "
        f"forward {summary['forward_seconds']:.1f} s, write {summary['write_seconds']:.1f} s)"
    )
