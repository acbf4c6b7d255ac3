"""Benchmark: does training in bf16 give the same SAEs as fp32? Every arch, paired by seed.

    python benchmarks/bench_precision_parity.py [--archs standard,jumprelu,batchtopk,matryoshka,matching_pursuit,recipe]
                                                [--protocol mini] [--seeds 3] [--jobs 3] [--samples N]
                                                [--store runs/parity.sqlite] [--compare-only]

Trains every arch at the protocol's natural L0 for `--seeds` seeds once with `--precision fp32` and once
with `--precision bf16` (the same seeds, so each pair sees the same data stream up to the sampler's own
bf16 rounding), then prints per arch the F1 and MCC of both, the paired difference Δ = bf16 − fp32 with
its standard error over seeds, and whether |ΔF1| ≤ 2 se (issue 16's parity bound). `--compare-only`
skips training and pairs the runs already in the store (e.g. two `saelab bench ... --precision` runs).
On a CPU without bf16 units the bf16 products are emulated (`saelab.devices.EmulatedBf16Matmuls`):
the numerics are bf16's, the speed is not. A JSON summary line ends the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16")


def latest_by_seed(
    runs: Iterable[Mapping[str, Any]], samples: int | None
) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    """{(arch, precision, seed): run}: the leaderboard's latest complete run per seed, on `samples` (None: any),
    fp32 or bf16 only."""
    from saelab.bench.leaderboard import latest_complete_runs

    return {
        (arch, precision, seed): run
        for (_, arch, _, budget, precision, seed), run in latest_complete_runs(runs).items()
        if precision in PRECISIONS and (samples is None or budget == samples)
    }


def parity_rows(runs: Iterable[Mapping[str, Any]], samples: int | None = None) -> list[dict[str, Any]]:
    """Per arch with both precisions: mean ± sd of F1 and MCC per precision, the paired ΔF1 and ΔMCC
    (bf16 − fp32, `bench.paired.paired_delta`) and `within_2se` (|ΔF1| ≤ 2 se; None with fewer than 2 seeds)."""
    from saelab.bench.leaderboard import metric_value
    from saelab.bench.paired import paired_delta

    latest = latest_by_seed(runs, samples)
    rows = []
    for arch in sorted({a for a, _, _ in latest}):
        row: dict[str, Any] = {"arch": arch}
        for metric in ("f1", "mcc"):
            by_precision = {
                p: {s: metric_value(r, metric) for (a, q, s), r in latest.items() if a == arch and q == p}
                for p in PRECISIONS
            }
            by_precision = {p: {s: v for s, v in d.items() if v is not None} for p, d in by_precision.items()}
            if not all(by_precision.values()):
                break
            for p, values in by_precision.items():
                vals = list(values.values())
                row[f"{metric}_{p}"] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
            row[f"delta_{metric}"] = paired_delta(by_precision["fp32"], by_precision["bf16"], metric).to_dict()
        else:
            d = row["delta_f1"]
            row["within_2se"] = None if d["se"] is None else abs(d["delta"]) <= 2 * d["se"]
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def ms(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    def delta(d: Mapping[str, Any]) -> str:
        return f"{d['delta']:+.4f}" + ("" if d["se"] is None else f" ± {d['se']:.4f}")

    print("| arch | F1 fp32 | F1 bf16 | ΔF1 ± se (paired) | within 2 se | MCC fp32 | MCC bf16 | ΔMCC ± se | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = {True: "yes", False: "**no**", None: "— (1 seed)"}[r["within_2se"]]
        print(
            f"| {r['arch']} | {ms(r['f1_fp32'])} | {ms(r['f1_bf16'])} | {delta(r['delta_f1'])} | {ok} | "
            f"{ms(r['mcc_fp32'])} | {ms(r['mcc_bf16'])} | {delta(r['delta_mcc'])} | {r['delta_f1']['n_seeds']} |"
        )


def main() -> None:
    from saelab.bench.protocols import get_protocol
    from saelab.bench.runner import BenchRequest, run_bench
    from saelab.bench.store import ResultsStore
    from saelab.cli.common import parse_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="standard,jumprelu,batchtopk,matryoshka,matching_pursuit,recipe")
    parser.add_argument("--protocol", default="mini")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--samples", default=None, help="training samples (default: the protocol's)")
    parser.add_argument("--store", type=Path, default=Path("runs/parity.sqlite"))
    parser.add_argument("--out", type=Path, default=Path("runs/parity"), help="folder for run folders")
    parser.add_argument("--compare-only", action="store_true", help="pair the runs already in the store")
    args = parser.parse_args()

    proto = get_protocol(args.protocol)
    samples = parse_count(args.samples) if args.samples else proto.samples
    walls: dict[str, float] = {}
    if not args.compare_only:
        store = ResultsStore(args.store)
        for precision in PRECISIONS:
            request = BenchRequest(
                protocol=proto,
                archs=args.archs.split(","),
                l0s=[float(proto.natural_l0)],
                seeds=list(range(args.seeds)),
                samples=samples,
                out_dir=args.out / precision,
                precision=precision,
            )
            started = time.perf_counter()
            run_bench(request, store=store, progress=False, jobs=args.jobs)
            walls[precision] = time.perf_counter() - started
            print(f"{precision}: {walls[precision] / 60:.1f} min wall ({args.jobs} jobs)", flush=True)
    store = ResultsStore(args.store, create=False)
    archs = set(args.archs.split(","))
    runs = [r for r in store.runs(protocol=proto.name, status="complete") if r["arch"] in archs]
    rows = parity_rows(runs, samples)
    print_table(rows)
    print(json.dumps({"protocol": proto.name, "samples": samples, "wall_seconds": walls, "rows": rows}))


if __name__ == "__main__":
    main()
