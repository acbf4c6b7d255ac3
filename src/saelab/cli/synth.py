"""`saelab synth ...`: build, inspect, sample and save ground-truth synthetic models."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from saelab.cli import app
from saelab.errors import ConfigError
from saelab.io import atomic_path
from saelab.synthetic import (
    REFERENCE_STATS,
    SyntheticModel,
    describe_model,
    list_presets,
    save_synthetic_model,
)
from saelab.synthetic import load_source as _load_source
from saelab.synthetic.threads import torch_threads

synth_app = typer.Typer(
    name="synth",
    help="Ground-truth synthetic activations (SynthSAEBench-style models). "
    f"Presets: {', '.join(list_presets())}; or pass a folder saved by saelab or SAELens.",
    no_args_is_help=True,
)
app.add_typer(synth_app, name="synth")

_SOURCE_HELP = f"Preset name ({', '.join(list_presets())}) or path to a saved model folder (saelab or SAELens)."


def load_source(spec: str, device: str = "cpu") -> SyntheticModel:
    """A preset name (built) or a path to a saved model folder (loaded), on `device`."""
    return _load_source(spec, device=device)


def _print_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(name, value, "must be >= 1")


def _threads_ok(threads: int | None) -> None:
    if threads is not None:
        _positive("--threads", threads)


@synth_app.command("describe")
def describe(
    source: str = typer.Argument(..., help=_SOURCE_HELP),
    width: Optional[int] = typer.Option(None, "--width", help="Report L0 among features 0..W-1 (default: min(4096, F))."),
    samples: int = typer.Option(100_000, "--samples", help="Samples used to estimate L0."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling stream used for the estimates (not the model seed)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """True L0, L0 of the first W features, firing rates, superposition and hierarchy of a model."""
    _positive("--samples", samples)
    _threads_ok(threads)
    with torch_threads(threads):
        _describe(source, width, samples, seed, device, as_json)


def _describe(source: str, width: int | None, samples: int, seed: int, device: str, as_json: bool) -> None:
    if width is not None:
        _positive("--width", width)
    model = load_source(source, device=device)
    if width is not None and width > model.num_features:
        raise ConfigError("--width", width, f"must be <= num_features ({model.num_features})")
    t0 = time.perf_counter()
    info = describe_model(model, width=width, n_samples=samples, seed=seed)
    info["stats_seconds"] = time.perf_counter() - t0
    info["source"] = source
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
        table.add_row(name, value, f"{ref[key]:g}" if key and key in ref and (key != "l0_first_width" or ref.get("width") == info["width"]) else "")

    row("features × hidden dim", f"{info['num_features']} × {info['hidden_dim']}")
    row("true L0", f"{info['true_l0']:.3f} ± {info['true_l0_stderr']:.3f}", "true_l0")
    row(f"L0 of first {info['width']} features", f"{info['l0_first_width']:.3f}", "l0_first_width")
    row("firing probability (configured)", f"{info['firing_probability_min']:.2e} … {info['firing_probability_max']:.3f}")
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
    Console().print(table)


@synth_app.command("sample")
def sample(
    source: str = typer.Argument(..., help=_SOURCE_HELP),
    samples: int = typer.Option(..., "--samples", help="Number of samples to draw."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Samples per batch."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write a safetensors file: hidden (N×D) and the features as COO triples."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Draw samples, report build time and sampling throughput, optionally write them out."""
    _positive("--samples", samples)
    _positive("--batch-size", batch_size)
    _threads_ok(threads)
    with torch_threads(threads):
        _sample(source, samples, batch_size, device, out, as_json, threads)


def _sample(
    source: str, samples: int, batch_size: int, device: str, out: Path | None, as_json: bool, threads: int | None
) -> None:
    model = load_source(source, device=device)
    hidden, rows, feats, vals = [], [], [], []
    done = 0
    total_nnz = 0
    _sync(model.device)
    t0 = time.perf_counter()
    while done < samples:
        bs = min(batch_size, samples - done)
        if out is None:
            h, acts = model.sample_sparse(bs)
            total_nnz += acts.nnz
        else:
            h, acts = model.sample_sparse(bs)
            total_nnz += acts.nnz
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
    }
    if out is not None:
        from safetensors.torch import save_file

        tensors = {
            "hidden": torch.cat(hidden),
            "feature_batch_idx": torch.cat(rows),
            "feature_idx": torch.cat(feats),
            "feature_values": torch.cat(vals),
        }
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"source": source, "num_features": str(model.num_features)})
        result["out"] = str(out)
    if as_json:
        _print_json(result)
        return
    typer.echo(f"build_seconds: {result['build_seconds']:.3f}")
    typer.echo(f"samples_per_second: {result['samples_per_second']:.1f}")
    typer.echo(f"mean_l0: {result['mean_l0']:.3f}")
    if out is not None:
        typer.echo(f"wrote {out}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@synth_app.command("save")
def save(
    preset: str = typer.Argument(..., help=f"Preset name ({', '.join(list_presets())})."),
    out: Path = typer.Option(..., "--out", help="Folder to write (saelab format, also readable by SAELens when possible)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Build a preset and save it."""
    if preset not in list_presets():
        raise ConfigError("preset", preset, f"unknown preset; valid presets are {', '.join(list_presets())}")
    _threads_ok(threads)
    with torch_threads(threads):
        model = load_source(preset)
    save_synthetic_model(model, out)
    result = {"preset": preset, "out": str(out), "build_seconds": model.build_seconds}
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"built {preset} in {model.build_seconds:.2f}s, saved to {out}")
