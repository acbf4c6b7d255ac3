"""`saelab train` and `saelab eval`."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from saelab.cli import app
from saelab.cli.common import (
    METRIC_COLUMNS,
    SYNTHETIC_METRICS,
    TRUST_CODE_OPTION,
    arch_names_help,
    check_seed,
    out,
    parse_count,
    print_json,
    results_table,
)
from saelab.cli.options import config_command
from saelab.errors import ConfigError
from saelab.metrics.lm import SPLICE_DETAIL_KEYS
from saelab.metrics.names import (
    LANGUAGE_MODEL,
    TRANSCODER_RUN_METRICS,
    ground_truth_keys,
    metric_keys,
    table_columns,
)
from saelab.runs.config import RunConfig

JSON_KEYS = [*SYNTHETIC_METRICS, "samples_per_second", "compute_precision", "run_dir"]
# Real activations: the synthetic line minus ground truth, plus the spliced-LM metrics when evaluated.
REAL_METRICS = (*(k for k in SYNTHETIC_METRICS if k not in ground_truth_keys()), *metric_keys(LANGUAGE_MODEL))
REAL_JSON_KEYS = [*REAL_METRICS, "samples_per_second", "compute_precision", "run_dir"]
REAL_COLUMNS = [("name", "SAE", "{}"), *table_columns(REAL_METRICS)]
# Transcoders (--transcoder plain|skip, or a saved one on a transcoder world): the synthetic line plus the target's metrics.
TRANSCODER_JSON_KEYS = [*SYNTHETIC_METRICS, *TRANSCODER_RUN_METRICS, *JSON_KEYS[len(SYNTHETIC_METRICS) :]]
TRANSCODER_COLUMNS = [*METRIC_COLUMNS, *table_columns(TRANSCODER_RUN_METRICS)]
# A transcoder on a real model's hooks (--out-hook-module, or a paired cache): the target's FVU and the
# parts of CE recovered (clean / spliced / zero-ablated CE, KL of the zero-ablation) when spliced in.
REAL_TRANSCODER_METRICS = (*REAL_METRICS, "fvu", "skip_norm", *SPLICE_DETAIL_KEYS)
REAL_TRANSCODER_JSON_KEYS = [*REAL_TRANSCODER_METRICS, "samples_per_second", "compute_precision", "run_dir"]
REAL_TRANSCODER_COLUMNS = [*REAL_COLUMNS, *table_columns(("fvu",))]


# Config fields a run sets itself: an --option for them would contradict --width, the data or --device.
RESERVED_OPTIONS = {
    "d_in": "the data's width",
    "d_sae": "--width",
    "device": "--device",
    "d_out": "--transcoder (the targets' width)",
}


def _parse_options(options: list[str], archs: list[str]) -> dict[str, dict[str, object]]:
    """`--option k=4` applies to every arch; `--option batchtopk.k=4` to one. Each NAME must be a field
    of that architecture's config and VALUE (JSON, else a string) of the field's type."""
    parsed: dict[str, dict[str, object]] = {}
    for item in options:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("option", item, "must look like NAME=VALUE or ARCH.NAME=VALUE")
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            value = raw
        arch, dot, name = key.rpartition(".")
        if dot and arch not in archs:
            raise ConfigError("option", item, f"{arch!r} is not among the architectures trained ({', '.join(archs)})")
        for target in [arch] if dot else archs:
            _check_option(target, name, value, item)
            parsed.setdefault(target, {})[name] = value
    return parsed


def _check_option(arch: str, name: str, value: object, item: str) -> None:
    import dataclasses
    import typing

    from saelab.saes.registry import get_sae_class

    cfg_cls = get_sae_class(arch).config_class
    fields = [f.name for f in dataclasses.fields(cfg_cls)]
    if name in RESERVED_OPTIONS:
        raise ConfigError("option", item, f"{name} is set by {RESERVED_OPTIONS[name]}, not by --option")
    if name not in fields:
        choices = ", ".join(f for f in fields if f not in RESERVED_OPTIONS)
        raise ConfigError("option", item, f"{arch} has no option {name!r}; its options are {choices}")
    try:
        hint = typing.get_type_hints(cfg_cls).get(name)
    except Exception:  # noqa: BLE001 (an annotation that cannot be resolved is not checked here)
        return
    expected = _type_text(hint)
    if expected is not None and not _matches(value, hint):
        raise ConfigError("option", item, f"{arch}.{name} must be {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError("option", item, f"{arch}.{name} must be finite")


def _matches(value: object, hint: object) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: the config's own validation decides


def _type_text(hint: object) -> str | None:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(arg) for arg in typing.get_args(hint)]
        return None if None in parts else " or ".join(parts)  # type: ignore[arg-type]
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]  # type: ignore[index]
    if origin in (list, tuple):
        return "a JSON list"
    if origin is dict or hint is dict:
        return "a JSON object"
    return None


@app.command()
@config_command(RunConfig, exclude=("device",), extra_help={"arch": arch_names_help()})
def train(
    config: RunConfig,
    ctx: typer.Context,
    device: str = typer.Option("cpu", metavar="TEXT", help="cpu, cuda or cuda:N."),
    option: list[str] = typer.Option(
        [], metavar="NAME=VALUE", help="Architecture option, NAME=VALUE (every arch) or ARCH.NAME=VALUE."
    ),
    out_dir: Path | None = typer.Option(None, "--out", metavar="DIR", help="Run folder (default runs/<time>-<arch>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the killed run in --out from its last checkpoint."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON line per SAE at the end."),
) -> None:
    """Train SAEs on a data stream, evaluate them (ground truth, or the spliced LM) and save a run folder.

    A bare `saelab train` uses the defaults shown (lr 3e-4, constant schedule, dead window 1000). The mini protocol's settings (lr 2e-3, decay over the final third, dead window 100) come with `saelab bench --protocol mini`."""
    import dataclasses

    from saelab.bench.paths import check_writable_dir
    from saelab.devices import resolve_device
    from saelab.runs import run_training
    from saelab.saes.registry import arch_label

    init_notes: list[str] = []
    if config.init_from is not None:  # on --resume too: the same options must give the same config
        config, init_notes = _init_from_defaults(config, ctx)
    cfg = dataclasses.replace(config, device=resolve_device(device), arch_options=_parse_options(option, config.arch))
    arch, data, model, cache, activations = cfg.arch, cfg.data, cfg.model, cfg.cache, cfg.activations
    real = not cfg.has_ground_truth
    _check_paired_needs_transcoder(cfg)
    if out_dir is None:
        if resume:
            raise ConfigError("resume", True, "needs --out naming the run folder to resume")
        out_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(arch_label(a) for a in arch)}"
    if not resume:  # a bad --out fails now, not after training
        check_writable_dir(out_dir, "out")
    if not json_output:
        for note in init_notes:
            out.print(note)
    result = run_training(cfg, out_dir, resume=resume, progress=not json_output)
    transcoder = cfg.transcoder != "none"
    if real:
        keys = REAL_TRANSCODER_JSON_KEYS if transcoder else REAL_JSON_KEYS
    else:
        keys = TRANSCODER_JSON_KEYS if transcoder else JSON_KEYS
    from saelab.runs.warnings import budget_of_run, run_warnings

    warned = {r["name"]: run_warnings(r, budget_of_run(cfg)) for r in result.results}
    if json_output:
        for record in result.results:
            print_json(
                {
                    **{k: record.get(k) for k in keys if k != "run_dir" and (k in record or not real)},
                    "name": record["name"],
                    "arch": record["arch"],
                    "l0_target": record["l0_target"],
                    "run_dir": str(result.run_dir),
                    "warnings": warned[record["name"]],  # runs/warnings.py: L0 off target, many dead latents
                }
            )
        return
    if not result.results:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if real:
        out.print(
            results_table(
                f"{model or cache or ', '.join(activations)}: reconstruction metrics",
                result.results,
                REAL_TRANSCODER_COLUMNS if transcoder else REAL_COLUMNS,
            )
        )
    else:
        columns = TRANSCODER_COLUMNS if transcoder else METRIC_COLUMNS
        out.print(results_table(f"{data}: ground-truth metrics", result.results, columns))
    out.print(f"{result.samples_per_second:,.0f} samples/s, {result.wall_seconds:.1f} s; run folder: {result.run_dir}")
    for line in (w for ws in warned.values() for w in ws):
        print(f"warning: {line}", file=sys.stderr, flush=True)  # plain print: one unwrapped line each


def _check_paired_needs_transcoder(cfg: RunConfig) -> None:
    """(input, target) pairs from a real model (--out-hook-module, or a cache written with one) are
    for transcoders: without --transcoder the run is refused rather than silently training SAEs on x."""
    if cfg.transcoder != "none":
        return
    if cfg.out_hook_module is not None:
        where, out_hook = "--out-hook-module", cfg.out_hook_module
    elif cfg.cache:
        from saelab.activations.cache import is_paired_manifest, read_manifest

        manifest = read_manifest(cfg.cache)
        if not is_paired_manifest(manifest):
            return
        where, out_hook = f"cache {cfg.cache}", manifest["out_hook_module"]
    else:
        return
    raise ConfigError(
        "transcoder",
        cfg.transcoder,
        f"{where} gives (input, target) pairs (targets from {out_hook}): pass --transcoder plain or "
        "--transcoder skip to train transcoders on them (for SAEs on the inputs, leave out the output hook)",
    )


def _init_from_defaults(config: RunConfig, ctx: typer.Context) -> tuple[RunConfig, list[str]]:
    """--init-from: the folder's architecture, width and L0 stand in for --arch, --width and --l0 left
    out; those given must agree with it. Returns the config and one line per architecture saying how
    the pretrained weights become the SAE trained (runs/pretrained.py)."""
    import dataclasses

    from saelab.runs.pretrained import (
        check_init_arch,
        check_init_width,
        describe_init,
        load_pretrained_sae,
        pretrained_info,
    )
    from saelab.saes.registry import get_sae_class

    path = str(config.init_from)
    pretrained = load_pretrained_sae(path)
    info = pretrained_info(path, pretrained)

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)  # click's ParameterSource (typer vendors its own copy)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    changes: dict[str, Any] = {}
    if not given("arch"):
        changes["arch"] = [info.architectures[0]]
    if not given("width"):
        changes["width"] = info.d_sae
    if not given("l0"):
        if info.l0 is None:
            raise ConfigError("l0", None, f"{path} records no target L0: pass --l0 (the L0 to fine-tune toward)")
        changes["l0"] = [info.l0]
    config = dataclasses.replace(config, **changes) if changes else config
    for arch in config.arch:
        check_init_arch(arch, info)
    check_init_width(info, config.width)
    notes = [describe_init(pretrained, get_sae_class(arch), path) for arch in dict.fromkeys(config.arch)]
    return config, notes


@app.command("eval")
def eval_command(
    sae: Path = typer.Option(
        ...,
        help="An SAE folder: saelab's or SAELens's, Gemma Scope, dictionary_learning, sparsify or Llama Scope.",
    ),
    data: str = typer.Option(
        "synth-mini", help="Synthetic preset or saved model folder; a transcoder world (tc-mini) for transcoders."
    ),
    samples: str = typer.Option("100k", help="Evaluation samples."),
    seed: int = typer.Option(0, help="Seed of the evaluation samples."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    precision: str = typer.Option(
        "auto",
        help="auto, fp32 or bf16: the SAE's matmuls under bf16 autocast (auto: where the device has bf16 units).",
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON line with the scores."),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help="Your own architecture, module:Class or path/to/file.py:Class: load the SAE as this class (imports and runs that code).",
    ),
    trust_code: bool = TRUST_CODE_OPTION,
) -> None:
    """Score any saved SAE (or transcoder, on a transcoder world) against a synthetic model's ground truth."""

    from saelab.devices import precision_autocast, resolve_device, resolve_precision
    from saelab.runs.evaluate import score_on_ground_truth
    from saelab.saes.formats import load_pretrained
    from saelab.synthetic import load_source

    check_seed(seed)
    device = resolve_device(device)
    used_precision = resolve_precision(precision, device)
    n = parse_count(samples)
    loaded = load_pretrained(
        sae, device=device, arch=arch, trust_code=trust_code
    )  # before the model: a bad folder fails before a preset is built
    model = load_source(data, device=device)
    if loaded.cfg.d_in != model.hidden_dim:
        raise ConfigError("sae", str(sae), f"has d_in={loaded.cfg.d_in} but {data} has hidden_dim={model.hidden_dim}")
    start = time.perf_counter()
    with precision_autocast(used_precision, device):
        result: dict[str, Any] = score_on_ground_truth(loaded, model, n, seed=seed)  # a transcoder world too
    wall = time.perf_counter() - start
    result.update(
        {
            "samples_per_second": n / max(wall, 1e-9),
            "compute_precision": used_precision,
            "run_dir": str(sae),
            "name": sae.name,
        }
    )
    transcoder = loaded.cfg.d_out is not None
    if json_output:
        print_json({k: result.get(k) for k in (TRANSCODER_JSON_KEYS if transcoder else JSON_KEYS)})
        return
    out.print(results_table(f"{sae} on {data}", [result], TRANSCODER_COLUMNS if transcoder else METRIC_COLUMNS))
