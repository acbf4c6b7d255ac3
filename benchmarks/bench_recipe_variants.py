"""Benchmark: does a change to the recipe help? Variants × seeds, mean ± sd F1 and Δ against the recipe.

    python benchmarks/bench_recipe_variants.py --variant ista2=ista_steps:2 \\
        --variant learned_eta=learn_eta:true [--base recipe] [--samples 1.5M] [--seeds 3] [--jobs 3]

Each `--variant NAME=key:value[,key:value...]` is the base architecture (default `recipe`) with those
config overrides (values parsed as JSON, else kept as strings; saelab.bench.variants), registered as `BASE-NAME`;
`NAME@ARCH=...` derives it from ARCH instead, and `--also ARCH` adds a registered architecture as is. Every
variant and the unchanged base are trained together on each seed's data stream (so they see the
same samples) on the `mini` protocol, optionally at a smaller `--samples` budget; seeds run in
parallel worker processes. Printed: per variant mean ± sd of F1, MCC and L0, and ΔF1 against the
base with its standard error (paired by seed); results also go into the store (`--store`).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'name=key:value,key:value' → (name, overrides); values are JSON when they parse as JSON
    (saelab.bench.variants does the parsing, as for `saelab compare ARCH:key=value`)."""
    from saelab.bench.variants import parse_overrides
    from saelab.errors import ConfigError

    if "=" not in spec:
        raise SystemExit(f"--variant {spec!r}: expected NAME=key:value[,key:value...]")
    name, _, body = spec.partition("=")
    try:
        return name, parse_overrides(body, field_name="--variant", spec=spec, assign=":")
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def _specs(base: str, variants: dict[str, dict[str, Any]]) -> list:
    """`NAME[@ARCH]` → a VariantSpec registered as `ARCH-NAME` (ARCH defaults to the base)."""
    from saelab.bench.variants import VariantSpec

    specs = []
    for spec_name, overrides in variants.items():
        name, _, arch = spec_name.partition("@")
        arch = arch or base
        specs.append(VariantSpec(name=f"{arch}-{name}", base=arch, overrides=overrides, text=f"--variant {name}"))
    return specs


def _register(base: str, variants: dict[str, dict[str, Any]]) -> list[str]:
    """Register every variant (a dry run of its config, so a misspelt or invalid override fails before training)."""
    from saelab.bench.variants import register_variant_spec
    from saelab.errors import ConfigError
    from saelab.saes import get_sae_class

    try:
        get_sae_class(base)
        return [register_variant_spec(s).architecture for s in _specs(base, variants)]
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def _run_one_seed(base, variants, also, samples, seed, store_path, out_dir, threads):
    import torch

    from saelab.bench.protocols import get_protocol
    from saelab.bench.runner import BenchRequest, run_seed
    from saelab.bench.store import ResultsStore

    torch.set_num_threads(threads)
    names = _register(base, variants)
    request = BenchRequest(
        protocol=get_protocol("mini"),
        archs=[base, *also, *names],
        l0s=[12.0],
        seeds=[seed],
        samples=samples,
        out_dir=Path(out_dir),
        variants=_specs(base, variants),
    )
    store = ResultsStore(store_path) if store_path else None
    return run_seed(request, seed, time.strftime("%Y%m%d-%H%M%S"), store=store, progress=False)


def main() -> None:
    from saelab.cli.common import parse_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="NAME[@ARCH]=key:value[,key:value...]")
    parser.add_argument("--base", default="recipe")
    parser.add_argument("--also", action="append", default=[], help="another registered arch, trained as is")
    parser.add_argument("--samples", default=None, help="training samples (default: the mini protocol's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--store", type=Path, default=Path("runs/variants.sqlite"))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/variants"))
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if not args.variant and not args.also:
        raise SystemExit("name at least one --variant or --also")
    variants = dict(parse_variant(v) for v in args.variant)
    _register(args.base, variants)  # fail fast on unknown base / bad override names
    samples = parse_count(args.samples) if args.samples else None

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _run_one_seed,
                args.base,
                variants,
                args.also,
                samples,
                seed,
                str(args.store),
                str(args.out_dir),
                threads,
            )
            for seed in range(args.seeds)
        ]
        for future in cf.as_completed(futures):
            records += future.result()
    wall = time.perf_counter() - started

    from saelab.bench.paired import paired_delta

    by_arch: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_arch.setdefault(r["arch"], {})[r["seed"]] = r
    base_f1 = {seed: r["f1"] for seed, r in by_arch[args.base].items()}
    rows = []
    print(f"{'arch':34s} {'F1':>15s} {'MCC':>15s} {'L0':>6s} {'ΔF1 vs base':>17s} {'95% CI':>18s} verdict")
    for arch, per_seed in sorted(by_arch.items(), key=lambda kv: -statistics.fmean(r["f1"] for r in kv[1].values())):
        f1 = [r["f1"] for r in per_seed.values()]
        mcc = [r["mcc"] for r in per_seed.values()]
        l0 = statistics.fmean(r["l0"] for r in per_seed.values())
        sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
        row = {
            "arch": arch,
            "f1_mean": statistics.fmean(f1),
            "f1_sd": sd,
            "mcc_mean": statistics.fmean(mcc),
            "mcc_sd": statistics.stdev(mcc) if len(mcc) > 1 else 0.0,
            "l0_mean": l0,
            "n_seeds": len(f1),
        }
        delta = ci = verdict = ""
        if arch != args.base and set(per_seed) & set(base_f1):
            d = paired_delta(base_f1, {s: r["f1"] for s, r in per_seed.items()}, "f1")
            row.update({"delta_f1": d.delta, "delta_f1_se": d.se or 0.0, "delta_f1_ci95": d.ci95, "verdict": d.verdict})
            delta = f"{d.delta:+.3f} ± {d.se or 0.0:.3f}"
            ci = f"[{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}]" if d.ci95 else "—"
            verdict = d.verdict
        rows.append(row)
        print(
            f"{arch:34s} {row['f1_mean']:.3f} ± {sd:.3f}   {row['mcc_mean']:.3f} ± {row['mcc_sd']:.3f} "
            f"{l0:6.1f} {delta:>17s} {ci:>18s} {verdict}"
        )
    summary = {
        "base": args.base,
        "samples": samples,
        "seeds": args.seeds,
        "wall_seconds": wall,
        "variants": variants,
        "rows": rows,
    }
    print(f"wall {wall / 60:.1f} min")
    print(json.dumps(summary))
    if args.json_out:
        from saelab.io import write_json_atomic

        write_json_atomic(args.json_out, summary)


if __name__ == "__main__":
    main()
