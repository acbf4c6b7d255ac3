"""Benchmark: has F1 converged at the `mini` protocol's budget, and does the ranking match the paper?

    python benchmarks/bench_mini_convergence.py [--archs matryoshka,jumprelu,batchtopk,standard,matching_pursuit]
                                                [--seeds 3] [--jobs 3] [--budget 3M] [--factor 2]
                                                [--only base|double] [--store PATH] [--out FILE]

Trains every arch at the natural L0 for `--seeds` seeds at the protocol budget B and at factor·B
(same schedule, same seeds), then prints per arch: mean ± sd F1 at both budgets, the change
(pass: |ΔF1| ≤ 0.02, the acceptance bound), the wall time of the B run (pass: ≤ 30 min for all five
baselines × 3 seeds on 2 cores), and whether the F1 ranking at B matches the published SynthSAEBench
ranking (Matryoshka > BatchTopK ≈ JumpReLU > Standard > Matching Pursuit; the published table ties
BatchTopK and JumpReLU at 0.732, so either order of those two agrees). Results also go into the
results store, so `saelab results leaderboard` shows them. A JSON summary line ends the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PUBLISHED_ORDER = [["matryoshka"], ["batchtopk", "jumprelu"], ["standard"], ["matching_pursuit"]]


def ranking_matches(f1_by_arch: dict[str, float]) -> bool:
    """True when every published tier ranks above the next one (ties within a tier are free)."""
    tiers = [[a for a in tier if a in f1_by_arch] for tier in PUBLISHED_ORDER]
    tiers = [t for t in tiers if t]
    return all(min(f1_by_arch[a] for a in hi) > max(f1_by_arch[a] for a in lo) for hi, lo in zip(tiers, tiers[1:]))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    from saelab.bench.protocols import get_protocol
    from saelab.bench.runner import BenchRequest, run_bench
    from saelab.bench.store import ResultsStore
    from saelab.cli.common import parse_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="matryoshka,jumprelu,batchtopk,standard,matching_pursuit")
    parser.add_argument("--protocol", default="mini")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--budget", default=None, help="B (default: the protocol's samples)")
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--only", choices=["base", "double"], default=None, help="run one budget only")
    parser.add_argument("--store", type=Path, default=Path("runs/convergence.sqlite"))
    parser.add_argument("--out", type=Path, default=Path("runs/convergence.json"))
    args = parser.parse_args()

    proto = get_protocol(args.protocol)
    archs = args.archs.split(",")
    base = parse_count(args.budget) if args.budget else proto.samples
    budgets = {"base": base, "double": int(base * args.factor)}
    if args.only:
        budgets = {args.only: budgets[args.only]}
    store = ResultsStore(args.store)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    report: dict = {"protocol": proto.name, "archs": archs, "seeds": args.seeds, "runs": previous.get("runs", {})}
    for label, samples in budgets.items():
        request = BenchRequest(
            protocol=proto,
            archs=archs,
            l0s=[float(proto.natural_l0)],
            seeds=list(range(args.seeds)),
            samples=samples,
            out_dir=Path("runs/convergence") / f"{label}-{samples}",
        )
        started = time.perf_counter()
        records = run_bench(request, store=store, progress=False, jobs=args.jobs)
        wall = time.perf_counter() - started
        report["runs"][str(samples)] = {
            "label": label,
            "wall_seconds": wall,
            "jobs": args.jobs,
            "f1": {a: [r["f1"] for r in records if r["arch"] == a] for a in archs},
            "mcc": {a: [r["mcc"] for r in records if r["arch"] == a] for a in archs},
            "l0": {a: [r["l0"] for r in records if r["arch"] == a] for a in archs},
            "dead": {a: [r["dead_latents"] for r in records if r["arch"] == a] for a in archs},
        }
        print(f"{label}: {samples:,} samples, {wall / 60:.1f} min wall ({args.jobs} jobs)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    runs = report["runs"]
    b, d = str(budgets.get("base", base)), str(int(base * args.factor))
    print(f"\n| arch | F1 @ {int(b):,} | F1 @ {int(d):,} | ΔF1 | MCC @ {int(b):,} | L0 | dead |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for a in archs:
        row = {}
        for key, label in ((b, "base"), (d, "double")):
            if key in runs and runs[key]["f1"].get(a):
                row[label] = _stats(runs[key]["f1"][a])
        mcc = _stats(runs[b]["mcc"][a]) if b in runs else (float("nan"), 0.0)
        l0 = _stats(runs[b]["l0"][a])[0] if b in runs else float("nan")
        dead = _stats([float(v) for v in runs[b]["dead"][a]])[0] if b in runs else float("nan")
        delta = row["double"][0] - row["base"][0] if len(row) == 2 else None
        summary[a] = {"f1": row.get("base"), "f1_double": row.get("double"), "delta": delta}
        fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}" if ms else "—"  # noqa: E731
        print(
            f"| {a} | {fmt(row.get('base'))} | {fmt(row.get('double'))} | "
            f"{'—' if delta is None else f'{delta:+.3f}'} | {mcc[0]:.3f} ± {mcc[1]:.3f} | {l0:.1f} | {dead:.0f} |"
        )
    deltas = [s["delta"] for s in summary.values() if s["delta"] is not None]
    converged = bool(deltas) and max(abs(x) for x in deltas) <= 0.02
    ranking = ranking_matches({a: s["f1"][0] for a, s in summary.items() if s["f1"]})
    wall_b = runs[b]["wall_seconds"] if b in runs else None
    print(
        f"\nconverged (max |ΔF1| ≤ 0.02): {converged}; ranking matches published: {ranking}; "
        f"budget-B wall: {wall_b / 60 if wall_b else float('nan'):.1f} min"
    )
    print(
        json.dumps(
            {
                "converged": converged,
                "max_abs_delta": max(map(abs, deltas)) if deltas else None,
                "ranking_matches": ranking,
                "wall_minutes_base": wall_b / 60 if wall_b else None,
                "summary": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
