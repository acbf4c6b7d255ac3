"""`saelab train` and `saelab eval`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from saelab.cli import app
from saelab.cli.common import METRIC_COLUMNS, out, parse_count, parse_l0_values, print_json, results_table
from saelab.errors import ConfigError

JSON_KEYS = ["f1", "precision", "recall", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents",
             "samples_per_second", "run_dir"]
GROUND_TRUTH_KEYS = {"f1", "precision", "recall", "mcc", "uniqueness"}
# Real activations: the synthetic line minus ground truth, plus the spliced-LM metrics when evaluated.
REAL_JSON_KEYS = [k for k in JSON_KEYS if k not in GROUND_TRUTH_KEYS] + ["ce_loss_recovered", "kl_div"]
REAL_COLUMNS = [("name", "SAE", "{}"), ("explained_variance", "EV", "{:.3f}"), ("l0", "L0", "{:.2f}"),
                ("dead_latents", "dead", "{}"), ("ce_loss_recovered", "CE recovered", "{:.3f}"),
                ("kl_div", "KL", "{:.4f}")]


def _parse_options(options: list[str], archs: list[str]) -> dict[str, dict[str, object]]:
    """`--option k=4` applies to every arch; `--option batchtopk.k=4` to one."""
    parsed: dict[str, dict[str, object]] = {}
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("option", item, "must look like NAME=VALUE or ARCH.NAME=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        arch, dot, name = key.rpartition(".")
        targets = [arch] if dot else archs
        for target in targets:
            parsed.setdefault(target, {})[name] = value
    return parsed


@app.command()
def train(
    data: str = typer.Option("synth-mini", help="Synthetic preset name or a saved synthetic-model folder."),
    arch: list[str] = typer.Option(["batchtopk"], help="Architecture(s); several train together on one stream."),
    l0: list[str] = typer.Option(["12"], help="Target L0(s), e.g. --l0 10 12 14 or --l0 5..25."),
    width: int = typer.Option(1024, help="SAE width (number of latents)."),
    samples: str = typer.Option("5M", help="Training samples, e.g. 5M, 200k."),
    batch_size: int = typer.Option(1024),
    lr: float = typer.Option(3e-4),
    lr_schedule: str = typer.Option("constant", help="constant or cosine."),
    lr_warmup_steps: int = typer.Option(0),
    lr_decay_fraction: float = typer.Option(0.0, help="Linear decay to 0 over this final fraction."),
    seed: int = typer.Option(0),
    eval_samples: str = typer.Option("100k", help="Samples for the final ground-truth evaluation."),
    eval_every: int = typer.Option(0, help="Steps between ground-truth evaluations during training (0 = off)."),
    device: str = typer.Option("cpu"),
    bf16: bool = typer.Option(False, help="bf16 autocast for the SAE forward pass."),
    checkpoint_every: int = typer.Option(0, help="Steps between checkpoints (a final one is always written)."),
    dead_feature_window: int = typer.Option(1000, help="Steps without firing before a latent counts as dead (AuxK)."),
    option: list[str] = typer.Option([], help="Architecture option, NAME=VALUE or ARCH.NAME=VALUE."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<time>-<arch>)."),
    resume: bool = typer.Option(False, help="Continue the killed run in --out from its last checkpoint."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON line per SAE at the end."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face causal-LM folder (real activations; "
                                        "nothing is downloaded)."),
    layer: Optional[int] = typer.Option(None, help="Hook the output of this transformer block (0-based)."),
    hook_module: Optional[str] = typer.Option(None, help="Hook this named module instead of --layer."),
    dataset: Optional[str] = typer.Option(None, help="Text file (one document per line), folder of text files, "
                                          "`datasets` save_to_disk folder, or token file."),
    text_column: str = typer.Option("text", help="Text column of a `datasets` folder."),
    context_size: int = typer.Option(128, help="Tokens per context (documents are truncated)."),
    model_batch_size: int = typer.Option(8, help="Contexts per LM forward pass."),
    buffer_size: int = typer.Option(16384, help="Rows in the shuffling buffer."),
    model_dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 for the LM."),
    prefetch: bool = typer.Option(True, help="Run LM forward passes in a background thread."),
    cache: Optional[str] = typer.Option(None, help="Train from an activation cache written by `saelab cache`."),
    activations: list[str] = typer.Option([], help="Train from .npy/.safetensors [N, d_in] activation files."),
) -> None:
    """Train SAEs on a data stream, evaluate them (ground truth, or the spliced LM) and save a run folder."""
    from saelab.activations import uses_real_data
    from saelab.training.run import RunConfig, run_training

    cfg = RunConfig(
        data=data,
        arch=arch,
        l0=parse_l0_values(l0),
        width=width,
        samples=parse_count(samples),
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        lr_warmup_steps=lr_warmup_steps,
        lr_decay_fraction=lr_decay_fraction,
        seed=seed,
        eval_samples=parse_count(eval_samples, "eval_samples"),
        eval_every=eval_every,
        device=device,
        autocast_bf16=bf16,
        checkpoint_every=checkpoint_every,
        dead_feature_window=dead_feature_window,
        arch_options=_parse_options(option, arch),
        model=model, layer=layer, hook_module=hook_module, dataset=dataset, text_column=text_column,
        context_size=context_size, model_batch_size=model_batch_size, buffer_size=buffer_size,
        model_dtype=model_dtype, prefetch=prefetch, cache=cache, activations=activations,
    )
    real = uses_real_data(cfg)
    if out_dir is None:
        if resume:
            raise ConfigError("resume", True, "needs --out naming the run folder to resume")
        out_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(arch)}"
    result = run_training(cfg, out_dir, resume=resume, progress=not json_output)
    keys = REAL_JSON_KEYS if real else JSON_KEYS
    if json_output:
        for record in result.results:
            print_json({**{k: record.get(k) for k in keys if k != "run_dir" and (k in record or not real)},
                        "name": record["name"], "arch": record["arch"], "l0_target": record["l0_target"],
                        "run_dir": str(result.run_dir)})
        return
    if not result.results:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if real:
        out.print(results_table(f"{model or cache or ', '.join(activations)}: reconstruction metrics",
                                result.results, REAL_COLUMNS))
    else:
        out.print(results_table(f"{data}: ground-truth metrics", result.results, METRIC_COLUMNS))
    out.print(f"{result.samples_per_second:,.0f} samples/s, {result.wall_seconds:.1f} s; run folder: {result.run_dir}")


@app.command("eval")
def eval_command(
    sae: Path = typer.Option(..., help="An SAE folder (saelab's or SAELens's cfg.json + sae_weights.safetensors)."),
    data: str = typer.Option("synth-mini", help="Synthetic preset or saved synthetic-model folder."),
    samples: str = typer.Option("100k", help="Evaluation samples."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Score any saved SAE against a synthetic model's ground truth."""
    from saelab.metrics import evaluate_sae_on_synthetic
    from saelab.saes.saelens_format import load_sae
    from saelab.training.run import load_data

    model = load_data(data, device=device)
    loaded = load_sae(sae, device=device)
    if loaded.cfg.d_in != model.hidden_dim:
        raise ConfigError("sae", str(sae), f"has d_in={loaded.cfg.d_in} but {data} has hidden_dim={model.hidden_dim}")
    start = time.perf_counter()
    n = parse_count(samples)
    result = evaluate_sae_on_synthetic(loaded, model, n, seed=seed).to_dict()
    wall = time.perf_counter() - start
    result.update({"samples_per_second": n / max(wall, 1e-9), "run_dir": str(sae), "name": sae.name})
    if json_output:
        print_json({k: result.get(k) for k in JSON_KEYS})
        return
    out.print(results_table(f"{sae} on {data}", [result], METRIC_COLUMNS))
