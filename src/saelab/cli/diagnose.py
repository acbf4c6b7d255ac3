"""`saelab l0`, `saelab diagnose` and `saelab theory superposition|absorption`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer
from rich.markup import escape

from saelab.cli import app
from saelab.cli.common import (
    TRUST_CODE_OPTION,
    USER_ARCHS_OPTION,
    arch_names_help,
    check_seed,
    console,
    out,
    parse_count,
    print_json,
    results_table,
)
from saelab.devices import resolve_device
from saelab.errors import ConfigError, FileFormatError
from saelab.formatting import format_mean_sd

theory_app = typer.Typer(no_args_is_help=True, help="Closed-form results: superposition capacity, absorption.")
app.add_typer(theory_app, name="theory")


def _parse_ns(values: list[str]) -> list[int] | None:
    if not values:
        return None
    ns = []
    for v in values:
        if not str(v).strip(" ,"):  # `--n ""` is a mistake, not "use the default"
            raise ConfigError("n", v, "must be a positive integer")
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                number = float(part)
            except ValueError:
                raise ConfigError("n", part, "must be a positive integer") from None
            if not number.is_integer() or number < 1:
                raise ConfigError("n", part, "must be a positive integer")
            ns.append(int(number))
    return ns or None


# ------------------------------------------------------------------------------------------- l0
@app.command("l0")
def l0_command(
    ctx: typer.Context,
    data: str = typer.Option(
        "sbw-toy",
        help="Synthetic preset, synthetic-model folder, or activation file "
        "(.pt/.npy/.safetensors holding one [N, d_in] tensor).",
    ),
    arch: str = typer.Option("batchtopk", help=f"Architecture trained at each L0. {arch_names_help()}"),
    l0: list[str] = typer.Option(["5..25"], help="L0 values to sweep, e.g. --l0 5..25 or --l0 8 10 12 14."),
    width: int | None = typer.Option(
        None, help="SAE width (default: all features up to 1024, else a quarter; activations: 8·d_in)."
    ),
    samples: str = typer.Option("2M", help="Training samples per SAE (all SAEs share one stream)."),
    batch_size: int = typer.Option(1024, help="Samples per training step."),
    lr: float = typer.Option(3e-3, help="Adam learning rate (3e-3 converges the toy sweeps in ~2M samples)."),
    lr_decay_fraction: float = typer.Option(0.0, help="Linear decay to 0 over this final fraction of training."),
    dead_feature_window: int = typer.Option(1000, help="Steps without firing before a latent counts as dead (AuxK)."),
    seed: int = typer.Option(0, help="Seed of the SAEs' initialisation and the data stream."),
    n: list[str] = typer.Option(
        [],
        help="Fix the n values of s_n^dec (default: n from 1.25 to 2 × the candidate "
        "L0, at most 0.45 × width, iterated to a self-consistent candidate).",
    ),
    tolerance: float = typer.Option(0.05, help="Valley-floor tolerance on the combined normalised score."),
    eval_samples: str = typer.Option("4096", help="Held-out inputs the metrics are computed on."),
    gt_eval_samples: str = typer.Option("20k", help="Samples for the ground-truth scores (synthetic data only)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default runs/<time>-l0)."),
    json_output: bool = typer.Option(False, "--json", help="End with one JSON line: recommended_l0 and the metrics."),
    activations: str | None = typer.Option(None, help="Activation file or `saelab cache` folder (instead of --data)."),
    model: str | None = typer.Option(None, help="Local causal-LM folder: sweep on its activations (with --dataset)."),
    layer: int | None = typer.Option(None, help="With --model: hook the output of this block."),
    hook_module: str | None = typer.Option(None, help="With --model: hook this named module."),
    dataset: str | None = typer.Option(None, help="With --model: text file, folder, `datasets` folder or tokens."),
    context_size: int = typer.Option(128, help="With --model: tokens per context."),
    saes: list[Path] = typer.Option(
        [],
        "--saes",
        metavar="DIR",
        help="Score this family of pretrained SAEs (folders in any supported format, or a run folder) "
        "instead of training a sweep; --l0, if given, labels them in order.",
    ),
) -> None:
    """Train one SAE per L0 on a shared stream (or score a pretrained family with --saes), plot s_n^dec and decoder |cos| against L0, recommend an L0."""
    from saelab.bench.paths import check_writable_dir
    from saelab.diagnostics.l0_sweep import run_l0_sweep

    check_seed(seed)
    device = resolve_device(device)
    if width is not None and width < 1:
        raise ConfigError("width", width, "must be a positive integer")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be a positive integer")
    source: object = data
    if model is not None:
        from saelab.diagnostics.data import lm_data_handle

        if not dataset:
            raise ConfigError("dataset", dataset, "--model needs --dataset")
        if (layer is None) == (hook_module is None):
            raise ConfigError("layer", layer, "--model needs exactly one of --layer N and --hook-module NAME")
        source = lm_data_handle(
            model, dataset, layer=layer, hook_module=hook_module, context_size=context_size, device=device
        )
        data = source.spec
    elif activations is not None:
        source = data = activations

    if not l0:
        raise ConfigError("l0", l0, "give at least one L0 (e.g. --l0 5..25)")
    if out_dir is None:
        out_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-l0"
    if saes:
        _l0_family(
            ctx, saes, source, data, l0, n, tolerance, eval_samples, gt_eval_samples, seed, out_dir, device, json_output
        )
        return
    check_writable_dir(out_dir, "out")
    sweep = run_l0_sweep(
        source,
        l0,
        arch=arch,
        width=width,
        samples=parse_count(samples),
        batch_size=batch_size,
        lr=lr,
        lr_decay_fraction=lr_decay_fraction,
        dead_feature_window=dead_feature_window,
        seed=seed,
        ns=_parse_ns(n),
        tolerance=tolerance,
        eval_samples=parse_count(eval_samples, "eval_samples"),
        gt_eval_samples=parse_count(gt_eval_samples, "gt_eval_samples"),
        out_dir=out_dir,
        device=device,
        progress=not json_output,
    )
    if json_output:
        print_json(sweep.summary_json())
        return
    _print_l0_result(sweep, f"L0 sweep: {arch} width {sweep.width} on {data}", out_dir)


# Options of `saelab l0` that only train a sweep: with --saes they would do nothing, so they are refused.
TRAINING_ONLY_L0_OPTIONS = ("arch", "width", "samples", "batch_size", "lr", "lr_decay_fraction", "dead_feature_window")


def _l0_family(
    ctx: typer.Context,
    saes: list[Path],
    source: object,
    data: str,
    l0: list[str],
    n: list[str],
    tolerance: float,
    eval_samples: str,
    gt_eval_samples: str,
    seed: int,
    out_dir: Path,
    device: str,
    json_output: bool,
) -> None:
    """`saelab l0 --saes DIR ...`: the correct-L0 check on a pretrained family (diagnostics/l0_family.py)."""
    from saelab.bench.paths import check_writable_dir
    from saelab.diagnostics.l0_family import recommended_sae, run_l0_family

    def given(name: str) -> bool:
        where = ctx.get_parameter_source(name)  # click's ParameterSource (typer vendors its own copy)
        return where is not None and where.name not in ("DEFAULT", "DEFAULT_MAP")

    for name in TRAINING_ONLY_L0_OPTIONS:
        if given(name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(name, ctx.params.get(name), f"{flag} trains a sweep; --saes scores SAEs already trained")
    labels = None
    if given("l0"):
        labels = []
        for v in l0:
            try:
                labels.append(float(v))
            except ValueError:
                raise ConfigError("l0", v, "must be a number (one L0 per --saes folder)") from None
    check_writable_dir(out_dir, "out")
    sweep = run_l0_family(
        [str(p) for p in saes],
        source,
        l0s=labels,
        ns=_parse_ns(n),
        eval_samples=parse_count(eval_samples, "eval_samples"),
        gt_eval_samples=parse_count(gt_eval_samples, "gt_eval_samples"),
        tolerance=tolerance,
        seed=seed,
        out_dir=out_dir,
        device=device,
    )
    if json_output:
        print_json(
            {
                **sweep.summary_json(),
                "saes": [p.name for p in sweep.points],
                "recommended_sae": recommended_sae(sweep),
                "l0_source": sweep.config["l0_source"],
            }
        )
        return
    title = f"L0 family: {len(sweep.points)} {sweep.arch} SAEs, width {sweep.width}, on {data} (L0 {sweep.config['l0_source']})"
    _print_l0_result(sweep, title, out_dir)
    best = recommended_sae(sweep)
    if best is not None:
        out.print(f"recommended SAE: {escape(best)}")


def _print_l0_result(sweep, title: str, out_dir: Path) -> None:
    rec = sweep.recommendation
    rows = []
    for p, c in zip(sweep.points, rec.combined_score):
        row = {
            "l0": p.l0_target,
            "l0_measured": p.l0_measured,
            "combined": c,
            "cos": p.decoder_abs_cos,
            **{f"s{k}": p.s_dec[k] for k in rec.ns[:4]},
            **p.ground_truth,
        }
        rows.append(row)
    cols = [("l0", "L0", "{:g}"), ("l0_measured", "measured L0", "{:.2f}")]
    cols += [(f"s{k}", f"s_{k}^dec", "{:.4f}") for k in rec.ns[:4]]
    cols += [("combined", "combined", "{:.3f}"), ("cos", "dec |cos|", "{:.4f}")]
    if any(p.ground_truth for p in sweep.points):
        cols += [("mcc", "MCC", "{:.3f}"), ("f1", "F1", "{:.3f}")]
    out.print(results_table(title, rows, cols))
    truth = ""
    if sweep.true_l0_first_width is not None:
        truth = f" (true L0 of the first {sweep.width} features: {sweep.true_l0_first_width:.2f}, overall {sweep.true_l0:.2f})"
    out.print(f"recommended L0: [bold]{rec.recommended_l0:g}[/bold]{truth}")
    out.print(
        escape(
            f"rule: {rec.rule}; valley floor {rec.floor_l0s}; arg-min {rec.argmin_l0:g}; "
            f"decoder |cos| arg-min {rec.argmin_decoder_cos_l0:g}"
        )
    )
    for w in rec.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    out.print(f"plot: {Path(out_dir) / 'l0_sweep.png'}; results: {Path(out_dir) / 'l0_sweep.json'}")


# ------------------------------------------------------------------------------------------- diagnose
DIAG_COLUMNS = [
    ("name", "SAE", "{}"),
    ("l0", "L0", "{:.2f}"),
    ("absorption_rate", "absorption", "{:.3f}"),
    ("parent_miss_rate_with_child", "parent miss|child", "{:.3f}"),
    ("parent_miss_rate_parent_only", "parent miss|alone", "{:.3f}"),
    ("mean_abs_excess_cos_top1", "hedge |f_top|", "{:.4f}"),
    ("mean_mixing", "mixing", "{:.3f}"),
    ("recall_weighted", "recall", "{:.3f}"),
    ("n", "n", "{}"),
    ("s_dec", "s_n^dec", "{:.4f}"),
    ("decoder_abs_cos", "dec |cos|", "{:.4f}"),
]
ABSORPTION_KEYS = {"absorption_rate", "parent_miss_rate_with_child", "parent_miss_rate_parent_only"}


def _natural_key(path: Path) -> list:
    """'l0_5' < 'l0_10': numbers in names compare as numbers."""
    import re

    return [float(t) if t[:1].isdigit() else t for t in re.findall(r"\d+(?:\.\d+)?|\D+", path.name)]


def _sae_folders(run: Path) -> list[Path]:
    from saelab.saes.formats import is_sae_path

    if (run / "cfg.json").exists() or (run.is_dir() and is_sae_path(run)):  # any pretrained format too
        return [run]
    saes = run / "saes"
    if not saes.is_dir():
        raise FileFormatError(
            f"{run} is neither an SAE folder (SAELens, Gemma Scope, dictionary_learning, sparsify or Llama Scope) "
            "nor a run folder (saes/)"
        )
    folders = sorted((p for p in saes.iterdir() if (p / "cfg.json").exists()), key=_natural_key)
    if not folders:
        raise FileFormatError(f"{saes} holds no SAE folders")
    return folders


def _run_data(run: Path) -> str | None:
    for candidate in (run / "run.json", run.parent.parent / "run.json"):
        if candidate.exists():
            try:
                record = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise FileFormatError(f"{candidate} is not valid JSON: {err}") from None
            config = record.get("config", {}) if isinstance(record, dict) else None
            if not isinstance(config, dict):
                raise FileFormatError(f'{candidate} is not a saelab run.json (no "config" object)')
            # Runs on real activations: their cache or first array file; a live LM has no file to re-read.
            if config.get("cache") or config.get("activations"):
                return config.get("cache") or config["activations"][0]
            if config.get("model"):
                raise ConfigError(
                    "data",
                    None,
                    f"{run} was trained on a live LM; pass --data with an activation "
                    "file or a `saelab cache` folder of the same layer",
                )
            return config.get("data")
    return None


@app.command("diagnose")
def diagnose_command(
    run: Path = typer.Argument(..., help="A run folder (run.json + saes/) or one SAE folder."),
    data: str | None = typer.Option(None, help="Synthetic preset or model folder (default: the run's data)."),
    sae: list[str] = typer.Option([], help="Only these SAEs of the run (folder names)."),
    samples: str = typer.Option("50k", help="Samples for the activation-based diagnostics."),
    n: int | None = typer.Option(None, help="n for s_n^dec (default: 2 × the SAE's L0, at most 0.45 × width)."),
    parent_cos: float = typer.Option(0.1, help="Excess parent component that makes a child latent 'absorbing'."),
    top_features: int = typer.Option(5, help="How many of the most frequent features hedging is measured on."),
    seed: int = typer.Option(0, help="Seed of the diagnostic samples."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    out_dir: Path | None = typer.Option(None, "--out", help="Where plots go (default RUN/diagnostics)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per SAE."),
    arch: list[str] = USER_ARCHS_OPTION,
    trust_code: bool = TRUST_CODE_OPTION,
) -> None:
    """Absorption, hedging, recall-vs-frequency and L0 metrics for every SAE of a run; prints a summary, writes plots."""
    from saelab.bench.paths import check_writable_dir
    from saelab.diagnostics.report import diagnose_run
    from saelab.saes.registry import import_user_architectures

    check_seed(seed)
    device = resolve_device(device)
    n_samples = parse_count(samples)
    if n is not None and n < 1:
        raise ConfigError("n", n, "must be a positive integer")
    if top_features < 1:
        raise ConfigError("top_features", top_features, "must be a positive integer")
    if not -1 <= parent_cos <= 1:  # as hierarchy_diagnostics requires (NaN fails too), before any loading
        raise ConfigError("parent_cos", parent_cos, "must be in [-1, 1]")
    if not run.exists():
        raise FileFormatError(f"{run} does not exist")
    data = data or _run_data(run)
    if data is None:
        raise ConfigError("data", None, f"{run} has no run.json naming its data; pass --data")
    folders = _sae_folders(run)
    check_writable_dir(out_dir or run / "diagnostics", "out")
    import_user_architectures(arch)
    results = diagnose_run(
        folders,
        data,
        out_dir=out_dir or run / "diagnostics",
        only=sae,
        n_samples=n_samples,
        n=n,
        parent_cos=parent_cos,
        top_features=top_features,
        seed=seed,
        device=device,
        trust_code=trust_code,
    )
    if json_output:
        for r in results:
            print_json(r)
        return
    columns = DIAG_COLUMNS
    if all(not isinstance(r.get("absorption_rate"), float) or math.isnan(r["absorption_rate"]) for r in results):
        columns = [c for c in columns if c[0] not in ABSORPTION_KEYS]
    out.print(results_table(f"Diagnostics on {data}", results, columns))
    by_warning: dict[str, list[str]] = {}
    for r in results:
        for w in r.get("warnings", []):
            by_warning.setdefault(w, []).append(r["name"])
    for w, names in by_warning.items():
        who = "all SAEs" if len(names) == len(results) else ", ".join(names)
        console.print(f"[yellow]warning ({escape(who)}):[/yellow] {escape(w)}")
    out.print(f"plots and diagnostics.json in {results[0]['out_dir'] if results else out_dir}")


# ------------------------------------------------------------------------------------------- theory
@theory_app.command("superposition")
def superposition_command(
    d: int = typer.Option(768, help="Dimension of the space."),
    n: str = typer.Option("16384", help="Number of vectors (16384, 16k, 1e13, 10^13)."),
    simulate: bool = typer.Option(False, "--simulate", help="Also estimate by sampling N random unit vectors."),
    queries: int = typer.Option(2048, help="Vectors whose max |cos| the simulation averages."),
    max_interference: list[float] = typer.Option(
        [], help="Inverse: how many vectors fit under this mean-max |cos| (default 0.05 0.10 0.15 0.20)."
    ),
    seed: int = typer.Option(0, help="Seed of the simulation (--simulate)."),
    plot: Path | None = typer.Option(None, help="Write the plot here (PNG)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line."),
) -> None:
    """Expected mean-max |cos| of N random unit vectors in d dims: closed form, approximation, simulation, inverse."""
    from saelab.diagnostics.superposition import (
        DEFAULT_INTERFERENCES,
        parse_big_count,
        plot_superposition,
        superposition_report,
    )

    check_seed(seed)
    n_value = parse_big_count(n)
    for eps in max_interference:
        if not 0 < eps < 1:
            raise ConfigError("max_interference", eps, "must be in (0, 1)")
    report = superposition_report(
        d,
        n_value,
        simulate=simulate,
        queries=queries,
        seed=seed,
        interferences=tuple(max_interference) or DEFAULT_INTERFERENCES,
    )
    if plot is not None:
        plot_superposition(report, str(plot))
    if json_output:
        print_json(report.to_dict() | ({"plot": str(plot)} if plot else {}))
        return
    rows = [
        {
            "n": f"{r['n']:.6g}",
            "log10_n": r["log10_n"],
            "expected": r["expected_mean_max_abs_cos"],
            "approx": r["approximation"],
            "cap": r["cap_bound"],
            "sim": report.simulated if r["n"] == report.n and report.simulated is not None else None,
        }
        for r in report.ladder
    ]
    out.print(
        results_table(
            f"Mean-max |cos| of N random unit vectors in d={d}",
            rows,
            [
                ("n", "N", "{}"),
                ("log10_n", "log10 N", "{:.2f}"),
                ("expected", "closed form", "{:.4f}"),
                ("approx", "√(2 ln N/d)", "{:.4f}"),
                ("cap", "cap bound", "{:.4f}"),
                ("sim", "simulated", "{:.4f}"),
            ],
        )
    )
    inv = [{"eps": r["max_interference"], "log10": r["log10_n_vectors"], "n": r["n_vectors"]} for r in report.inverse]
    out.print(
        results_table(
            f"How many random vectors fit in d={d} under a mean-max |cos|",
            inv,
            [("eps", "max interference", "{:.3f}"), ("n", "N", "{:.4g}"), ("log10", "log10 N", "{:.1f}")],
        )
    )
    line = (
        f"d={d}, N={n_value:.6g}: E\\[mean-max |cos|] = {report.expected_mean_max_abs_cos:.4f} "
        f"(approximation {report.approximation:.4f})"
    )
    if report.simulated is not None:
        line += f"; simulated {format_mean_sd(report.simulated, report.simulated_stderr, 4)}"
    out.print(line)
    if plot is not None:
        out.print(f"plot: {plot}")


@theory_app.command("absorption")
def absorption_command(
    p_both: float = typer.Option(..., "--p-both", help="P(parent and child active)."),
    p_parent_only: float = typer.Option(..., "--p-parent-only", help="P(parent active without the child)."),
    lam: float = typer.Option(..., "--lam", help="Sparsity coefficient λ."),
    penalty: str = typer.Option("l1", help="l1 (Σ a·‖d‖) or l0 (#active)."),
    train: bool = typer.Option(
        False, "--train", help="Also train tiny tied and untied SAEs on the toy and report absorption."
    ),
    steps: int = typer.Option(2000, help="Training steps for --train."),
    seed: int = typer.Option(0, help="Seed of the toy SAEs (--train)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line."),
) -> None:
    """Loss of the faithful vs the absorbing solution of the 2-feature parent/child toy."""
    from saelab.diagnostics.absorption_theory import absorption_losses, train_parent_child_toy

    check_seed(seed)
    theory = absorption_losses(p_both, p_parent_only, lam, penalty)
    result = theory.to_dict()
    if train:
        if p_both <= 0 or p_parent_only <= 0:
            raise ConfigError("--train", True, "needs p_both > 0 and p_parent_only > 0")
        if steps < 1:
            raise ConfigError("steps", steps, "must be positive")
        result["trained"] = {
            kind: train_parent_child_toy(kind == "tied", p_both, p_parent_only, lam, steps=steps, seed=seed).to_dict()
            for kind in ("untied", "tied")
        }
    if json_output:
        print_json(result)
        return
    q = "√2·p" if penalty == "l1" else "p"
    out.print(
        results_table(
            f"Parent/child toy: P(both)={p_both:g}, P(parent only)={p_parent_only:g}, λ={lam:g}, {penalty}",
            [
                {
                    "solution": "faithful",
                    "formula": "λ(q + 2p)",
                    "mse": result["mse_faithful"],
                    "loss": theory.loss_faithful,
                },
                {
                    "solution": "absorbing",
                    "formula": f"λ(q + {q})",
                    "mse": result["mse_absorbing"],
                    "loss": theory.loss_absorbing,
                },
            ],
            [
                ("solution", "solution", "{}"),
                ("formula", "sparsity cost", "{}"),
                ("mse", "MSE", "{:.3g}"),
                ("loss", "expected loss", "{:.6g}"),
            ],
        )
    )
    verdict = {
        "absorbing": "absorption has the lower loss",
        "faithful": "the faithful solution has the lower loss",
        "tie": "the two solutions tie",
    }[theory.preferred]
    out.print(f"advantage of absorbing: {theory.advantage:.6g}: {verdict}")
    if train:
        rows = [{"sae": k, **v} for k, v in result["trained"].items()]
        out.print(
            results_table(
                "Trained on the toy (initialised at the true features)",
                rows,
                [
                    ("sae", "SAE", "{}"),
                    ("absorbed", "absorbed", "{}"),
                    ("absorption_rate", "parent silent | both", "{:.2f}"),
                    ("child_decoder_parent_cos", "cos(child dec, parent)", "{:.3f}"),
                    ("parent_encoder_child_weight", "parent enc · child", "{:+.3f}"),
                    ("mse", "MSE", "{:.2e}"),
                ],
            )
        )
    if math.isclose(lam, 0.0):
        console.print(
            "[yellow]note:[/yellow] with λ = 0 both solutions cost nothing: sparsity is what drives absorption"
        )
