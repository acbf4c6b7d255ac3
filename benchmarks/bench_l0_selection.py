"""Benchmark: does `saelab l0` find the correct L0? And the Sparse-but-Wrong mechanism.

    python benchmarks/bench_l0_selection.py sbw        [--seeds 0,1,2] [--samples 2M] [--lr 3e-3]
    python benchmarks/bench_l0_selection.py mini       [--seeds 0] [--samples 6M] [--lr 1e-3] [--decay 0.333]
    python benchmarks/bench_l0_selection.py mechanism  [--samples 1M] [--lr 3e-3]
    python benchmarks/bench_l0_selection.py reanalyse  DIR [DIR ...]   # re-apply the rule to saved sweeps
                                                                       # (several DIRs of one data set: merged)

sbw:  BatchTopK width 50, L0 5..25, on sbw-toy (true L0 ≈ 11); pass: recommendation within ±1.
mini: BatchTopK width 1024, L0 6..20 step 2, on synth-mini (L0 of the first 1024 features ≈ 12.1);
      pass: within ±2. Settings follow the `mini` bench protocol (6M samples, lr 1e-3, decay over
      the final third).
mechanism: SAEs initialised at the true features of sbw-toy, trained at L0 5, 8, 11 (true), 15;
      prints the mixing trajectory (1 − cos² with the own feature) per L0.

Each sweep folder (`--out`, default /tmp/saelab-bench-l0/...) keeps run.json, the SAEs,
l0_sweep.json and l0_sweep.png. Prints one table per benchmark and a JSON line at the end.
Uses one torch thread (`--threads`) so that it can share a small machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _count(text: str) -> int:
    from saelab.cli.common import parse_count

    return parse_count(text)


def _row(sweep, seed: int) -> dict:
    rec = sweep.recommendation
    best = max(sweep.points, key=lambda p: p.ground_truth.get("mcc", 0.0))
    best_f1 = max(sweep.points, key=lambda p: p.ground_truth.get("f1", 0.0))
    return {
        "seed": seed,
        "true_l0": round(sweep.true_l0_first_width, 2) if sweep.true_l0_first_width else None,
        "recommended_l0": rec.recommended_l0,
        "method": rec.method,
        "valley_l0": rec.valley_l0,
        "knee_l0": rec.knee_l0,
        "argmin_l0": rec.argmin_l0,
        "floor": rec.floor_l0s,
        "n": f"{rec.ns[0]}..{rec.ns[-1]}",
        "decoder_cos_argmin": rec.argmin_decoder_cos_l0,
        "best_mcc_l0": best.l0_target,
        "best_f1_l0": best_f1.l0_target,
        "warnings": rec.warnings,
        "wall_s": round(sweep.wall_seconds),
    }


def sweep_bench(name: str, data: str, l0s: list[int], width: int | None, args, tol: float) -> list[dict]:
    from saelab.diagnostics.l0_sweep import run_l0_sweep

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.out) / f"{name}_s{seed}"
        sweep = run_l0_sweep(
            data,
            l0s,
            width=width,
            samples=_count(args.samples),
            lr=args.lr,
            lr_decay_fraction=args.decay,
            seed=seed,
            out_dir=out,
            gt_eval_samples=_count(args.gt_eval),
        )
        row = _row(sweep, seed)
        row["pass"] = abs(row["recommended_l0"] - round(sweep.true_l0_first_width)) <= tol
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mechanism(args) -> dict:
    from saelab.diagnostics.l0_mechanism import ground_truth_init_drift
    from saelab.synthetic import build_preset

    model = build_preset("sbw-toy")
    t0 = time.perf_counter()
    hist = ground_truth_init_drift(
        model,
        l0s=(5, 8, 11, 15),
        samples=_count(args.samples),
        lr=args.lr,
        eval_every=max(1, _count(args.samples) // 1024 // 8),
    )
    print(f"{'step':>6} " + " ".join(f"{'L0=' + format(k, 'g'):>22}" for k in hist))
    print(f"{'':>6} " + " ".join(f"{'self cos / mixing':>22}" for _ in hist))
    for i in range(len(next(iter(hist.values())))):
        cells = [f"{h[i]['self_cos']:10.4f} / {h[i]['mixing']:8.4f}" for h in hist.values()]
        print(f"{next(iter(hist.values()))[i]['step']:>6} " + " ".join(f"{c:>22}" for c in cells))
    print(f"wall {time.perf_counter() - t0:.0f} s")
    return {str(k): v[-1] for k, v in hist.items()}


def reanalyse(dirs: list[str]) -> None:
    """Re-apply the current rule to saved sweeps; the points of all DIRs are merged (first wins)."""
    from saelab.diagnostics.l0_select import recommend_l0
    from saelab.diagnostics.l0_sweep import load_sweep

    sweeps = [load_sweep(Path(d) / "l0_sweep.json") for d in dirs]
    points = {}
    for sw in sweeps:
        for p in sw.points:
            points.setdefault(p.l0_target, p)
    sweep = sweeps[0]
    sweep.points = [points[k] for k in sorted(points)]
    sweep.recommendation = recommend_l0(sweep.points, d_sae=sweep.width)
    print(json.dumps(_row(sweep, -1) | {"dirs": dirs}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["sbw", "mini", "mechanism", "reanalyse"])
    p.add_argument("dirs", nargs="*")
    p.add_argument("--seeds", default=None)
    p.add_argument("--samples", default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--decay", type=float, default=None)
    p.add_argument("--gt-eval", default="20k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/saelab-bench-l0")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = {
        "sbw": ("0,1,2", "2M", 3e-3, 0.0),
        "mini": ("0", "6M", 1e-3, 1 / 3),
        "mechanism": ("0", "1M", 3e-3, 0.0),
        "reanalyse": ("0", "1", 1e-3, 0.0),
    }[args.which]
    args.seeds = args.seeds or defaults[0]
    args.samples = args.samples or defaults[1]
    args.lr = args.lr if args.lr is not None else defaults[2]
    args.decay = args.decay if args.decay is not None else defaults[3]
    if args.which == "sbw":
        rows = sweep_bench("sbw", "sbw-toy", list(range(5, 26)), None, args, tol=1)
        print(json.dumps({"benchmark": "sbw", "rows": rows, "all_pass": all(r["pass"] for r in rows)}))
    elif args.which == "mini":
        rows = sweep_bench("mini", "synth-mini", list(range(6, 21, 2)), 1024, args, tol=2)
        print(json.dumps({"benchmark": "mini", "rows": rows, "all_pass": all(r["pass"] for r in rows)}))
    elif args.which == "mechanism":
        print(json.dumps({"benchmark": "mechanism", "final": mechanism(args)}))
    else:
        reanalyse(args.dirs)


if __name__ == "__main__":
    sys.exit(main())
