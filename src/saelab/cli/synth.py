"""`saelab synth ...`: build, inspect, sample and save ground-truth synthetic models."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import typer
from rich.table import Table

from saelab.cli import app
from saelab.cli.common import check_seed, json_safe, parse_count
from saelab.cli.terminal import MediumConsole
from saelab.devices import precision_autocast, resolve_device, resolve_precision
from saelab.errors import ConfigError
from saelab.formatting import format_mean_sd
from saelab.io import atomic_path
from saelab.synthetic import (
    REFERENCE_STATS,
    TranscoderWorld,
    build_from_config,
    describe_model,
    describe_transcoder_world,
    list_all_presets,
    load_source,
    save_synthetic_model,
)
from saelab.synthetic.threads import torch_threads

synth_app = typer.Typer(
    name="synth",
    help="Ground-truth synthetic activations (SynthSAEBench-style models) and transcoder worlds (tc-*). "
    f"Presets: {', '.join(list_all_presets())}; or pass a folder saved by saelab or SAELens.",
    no_args_is_help=True,
)
app.add_typer(synth_app, name="synth")

_SOURCE_HELP = f"Preset name ({', '.join(list_all_presets())}) or path to a saved model folder (saelab or SAELens)."


def _print_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(json_safe(obj), allow_nan=False))


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(name, value, "must be >= 1")


MAX_THREADS = 1024  # torch takes a C int; beyond this it is a typo, not a machine


def _threads_ok(threads: int | None) -> None:
    if threads is not None:
        _positive("--threads", threads)
        if threads > MAX_THREADS:
            raise ConfigError("--threads", threads, f"must be at most {MAX_THREADS}")


@synth_app.command("describe")
def describe(
    source: str = typer.Argument(..., help=_SOURCE_HELP),
    width: int | None = typer.Option(None, "--width", help="Report L0 among features 0..W-1 (default: min(4096, F))."),
    samples: str = typer.Option("100k", "--samples", help="Samples used to estimate L0, e.g. 100k, 1M."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the sampling stream used for the estimates (not the model seed)."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """True L0, L0 of the first W features, firing rates, superposition and hierarchy of a model."""
    n = parse_count(samples, "--samples")
    _threads_ok(threads)
    check_seed(seed, "--seed")
    device = resolve_device(device, "--device")
    if width is not None:
        _positive("--width", width)
    with torch_threads(threads):
        _describe(source, width, n, seed, device, as_json)


def _describe(source: str, width: int | None, samples: int, seed: int, device: str, as_json: bool) -> None:
    model = load_source(source, device=device)
    if width is not None and width > model.num_features:
        raise ConfigError("--width", width, f"must be <= num_features ({model.num_features})")
    t0 = time.perf_counter()
    if isinstance(model, TranscoderWorld):
        info = describe_transcoder_world(model, n_samples=samples, seed=seed)
    else:
        info = describe_model(model, width=width, n_samples=samples, seed=seed)
    info["stats_seconds"] = time.perf_counter() - t0
    info["source"] = source
    if isinstance(model, TranscoderWorld):
        if as_json:
            _print_json(info)
        else:
            _describe_world_table(info)
        return
    ref = REFERENCE_STATS.get(source)
    if ref is not None:
        info["reference"] = ref
    if as_json:
        _print_json(info)
        return
    _describe_table(info)


def _describe_table(info: dict[str, Any]) -> None:
    ref = info.get("reference", {})
    table = Table(title=f"synthetic model: {info['source']}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_column("reference", justify="right")

    def row(name: str, value: str, key: str | None = None) -> None:
        table.add_row(
            name,
            value,
            f"{ref[key]:g}"
            if key and key in ref and (key != "l0_first_width" or ref.get("width") == info["width"])
            else "",
        )

    row("features × hidden dim", f"{info['num_features']} × {info['hidden_dim']}")
    row("true L0", format_mean_sd(info["true_l0"], info["true_l0_stderr"], 3), "true_l0")
    row(f"L0 of first {info['width']} features", f"{info['l0_first_width']:.3f}", "l0_first_width")
    row(
        "firing probability (configured)",
        f"{info['firing_probability_min']:.2e} … {info['firing_probability_max']:.3f}",
    )
    row("firing rate (empirical)", f"{info['empirical_firing_rate_min']:.2e} … {info['empirical_firing_rate_max']:.3f}")
    row("mean max |cos|", f"{info['mean_max_abs_cos']:.4f}", "mean_max_abs_cos")
    row("mean |cos|", f"{info['mean_abs_cos']:.4f}")
    row("features per dim", f"{info['features_per_dim']:.2f}")
    row("bias norm", f"{info['bias_norm']:.3f}")
    h = info["hierarchy"]
    if h is None:
        row("hierarchy", "none")
    else:
        row("hierarchy roots / depth", f"{h['num_roots']} / {h['max_depth']}")
        row("features in hierarchy", f"{h['num_features_in_hierarchy']} (per depth {h['features_per_depth']})")
        row("mutually-exclusive groups", f"{h['num_me_groups']} (max {h['max_siblings']} siblings)")
        row("children scaled by parent", str(h["scale_children_by_parent"]))
    row("build seconds", f"{info['build_seconds']:.2f}")
    row("samples used", f"{info['n_samples']}")
    MediumConsole().print(table)  # on a file or a pipe: no 80-column cut


def _describe_world_table(info: dict[str, Any]) -> None:
    table = Table(title=f"transcoder world: {info['source']}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_row("inputs × d_in", f"{info['num_features']} × {info['d_in']}")
    table.add_row("output features × d_out", f"{info['num_output_features']} × {info['d_out']}")
    table.add_row("true L0 (inputs)", f"{info['true_l0']:.3f}")
    table.add_row("true L0 (output features)", format_mean_sd(info["output_true_l0"], info["output_true_l0_stderr"], 3))
    for kind, k in info["kinds"].items():
        rates = "" if k["count"] == 0 else f", firing {k['firing_rate_min']:.1e} … {k['firing_rate_max']:.3f}"
        table.add_row(f"{kind} outputs", f"{k['count']}{rates}")
    table.add_row("skip ‖S‖_F", f"{info['skip_norm']:.3f}")
    for part in ("feature", "skip", "noise", "cross"):
        table.add_row(f"y variance from {part}", f"{info[f'{part}_var_fraction']:.4f}")
    table.add_row("build seconds", f"{info['build_seconds']:.2f}")
    table.add_row("samples used", f"{info['n_samples']}")
    MediumConsole().print(table)  # on a file or a pipe: no 80-column cut


@synth_app.command("sample")
def sample(
    source: str = typer.Argument(..., help=_SOURCE_HELP),
    samples: str = typer.Option(..., "--samples", help="Number of samples to draw, e.g. 200k, 1M, 5e6."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Samples per batch."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    out: Path | None = typer.Option(
        None, "--out", help="Write a safetensors file: hidden (N×D) and the features as COO triples."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto, fp32 or bf16: the firing draw's correlation products under bf16 autocast (auto: where the "
        "device has bf16 units); magnitudes and the hidden vectors stay fp32.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Draw samples, report build time and sampling throughput, optionally write them out."""
    n = parse_count(samples, "--samples")
    _positive("--batch-size", batch_size)
    _threads_ok(threads)
    device = resolve_device(device, "--device")

    used = resolve_precision(precision, device, "--precision")
    if out is not None:
        from saelab.bench.paths import check_output_file

        check_output_file(out, "--out")
    with torch_threads(threads):
        _sample(source, n, batch_size, device, out, as_json, threads, used)


def _sample(
    source: str,
    samples: int,
    batch_size: int,
    device: str,
    out: Path | None,
    as_json: bool,
    threads: int | None,
    precision: str = "fp32",
) -> None:
    model = load_source(source, device=device)
    world = isinstance(model, TranscoderWorld)
    _check_sample_memory(model, samples, batch_size, device, keep=out is not None)
    hidden, rows, feats, vals = [], [], [], []
    targets, out_rows, out_feats, out_vals = [], [], [], []  # transcoder worlds: y and output codes
    done = 0
    total_nnz = 0
    total_out_nnz = 0
    _sync(model.device)
    t0 = time.perf_counter()
    # Only the draws run under autocast: the model above was built (and orthogonalised) in fp32.
    with precision_autocast(precision, device):
        while done < samples:
            bs = min(batch_size, samples - done)
            if world:
                h, y, acts, codes = model.sample_sparse(bs)
                total_out_nnz += codes.nnz
                if out is not None:
                    targets.append(y.cpu())
                    out_rows.append(codes.batch_idx.cpu() + done)
                    out_feats.append(codes.feature_idx.cpu())
                    out_vals.append(codes.values.cpu())
            else:
                h, acts = model.sample_sparse(bs)
            total_nnz += acts.nnz
            if out is not None:
                hidden.append(h.cpu())
                rows.append(acts.batch_idx.cpu() + done)
                feats.append(acts.feature_idx.cpu())
                vals.append(acts.values.cpu())
            done += bs
    _sync(model.device)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "source": source,
        "num_features": model.num_features,
        "hidden_dim": model.hidden_dim,
        "samples": samples,
        "batch_size": batch_size,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "build_seconds": model.build_seconds,
        "sample_seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else float("inf"),
        "mean_l0": total_nnz / samples,
        "compute_precision": precision,
    }
    if world:
        result.update(
            d_out=model.d_out, num_output_features=model.num_output_features, mean_output_l0=total_out_nnz / samples
        )
    if out is not None:
        from safetensors.torch import save_file

        tensors = {
            "hidden": torch.cat(hidden),
            "feature_batch_idx": torch.cat(rows),
            "feature_idx": torch.cat(feats),
            "feature_values": torch.cat(vals),
        }
        if world:
            tensors.update(
                target=torch.cat(targets),
                output_batch_idx=torch.cat(out_rows),
                output_feature_idx=torch.cat(out_feats),
                output_values=torch.cat(out_vals),
            )
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"source": source, "num_features": str(model.num_features)})
        result["out"] = str(out)
    if as_json:
        _print_json(result)
        return
    typer.echo(f"build_seconds: {result['build_seconds']:.3f}")
    typer.echo(f"samples_per_second: {result['samples_per_second']:.1f}")
    typer.echo(f"mean_l0: {result['mean_l0']:.3f}")
    if world:
        typer.echo(f"mean_output_l0: {result['mean_output_l0']:.3f}")
    if out is not None:
        typer.echo(f"wrote {out}")


def _check_sample_memory(model: Any, samples: int, batch_size: int, device: str, keep: bool) -> None:
    """Refuse what cannot fit before sampling: a batch draws a dense [batch, features] firing pattern and
    [batch, hidden] activations; --out keeps every sample's activations (and copies them once to save)."""
    from saelab.memory import FLOAT_BYTES, require_memory

    bs = min(batch_size, samples)
    require_memory(
        "--batch-size",
        batch_size,
        bs * (model.num_features + FLOAT_BYTES * model.hidden_dim),
        device,
        f"a batch of {bs} samples of {model.num_features} features",
    )
    if keep:
        dims = model.hidden_dim + getattr(model, "d_out", 0)  # a transcoder world keeps y too
        require_memory(
            "--samples",
            samples,
            2 * samples * FLOAT_BYTES * dims,
            "cpu",
            f"keeping {samples} samples of {dims} dims for --out",
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@synth_app.command("save")
def save(
    preset: str = typer.Argument(..., help=f"Preset name ({', '.join(list_all_presets())})."),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write (saelab format, also readable by SAELens when possible)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="KEY=VALUE: change a top-level field of the preset's config before building "
        "(repeatable), e.g. --set skip_scale=0 for a tc-mini world without a skip part.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Build a preset (optionally with changed fields) and save it."""
    if preset not in list_all_presets():
        raise ConfigError("preset", preset, f"unknown preset; valid presets are {', '.join(list_all_presets())}")
    _threads_ok(threads)
    from saelab.bench.paths import check_writable_dir
    from saelab.synthetic.presets import parse_overrides, preset_with_overrides

    changes = parse_overrides(overrides)
    cfg = preset_with_overrides(preset, changes)  # validated before the build, which can take minutes
    check_writable_dir(out, "--out")
    with torch_threads(threads):
        model = build_from_config(cfg) if changes else load_source(preset)
    save_synthetic_model(model, out)
    result = {"preset": preset, "set": changes, "out": str(out), "build_seconds": model.build_seconds}
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"built {preset} in {model.build_seconds:.2f}s, saved to {out}")
