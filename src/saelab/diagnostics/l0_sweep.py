"""L0 sweeps: train one SAE per L0 on one stream, score each without ground truth, apply the rule.

`run_l0_sweep` does all of it and writes `l0_sweep.json` (read back with `load_sweep`) and
`l0_sweep.png`; `score_sweep` scores SAEs trained elsewhere. The rule itself is `l0_select`.
`undertraining_warnings` flags sweeps whose SAEs had not finished training, which mislead the
rule without any other symptom.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.diagnostics.l0_plot import plot_l0_sweep
from saelab.diagnostics.l0_select import (
    DEFAULT_TOLERANCE,
    L0Point,
    L0Recommendation,
    default_ns,
    recommend_l0,
    validate_l0_values,
)
from saelab.diagnostics.projection import decoder_pairwise_abs_cos, nth_decoder_projection_scores
from saelab.errors import ConfigError, require

# The training run's own evaluation scores kept with each point (`L0Point.ground_truth`): on synthetic
# data they show how good each L0 really was, beside what the rule picked. The rule never reads them.
POINT_EVAL_METRICS = ("f1", "mcc", "precision", "recall", "explained_variance")


# ----------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_sae(sae: Any, x_BD: torch.Tensor, ns: Sequence[int]) -> tuple[dict[int, float], float, float | None]:
    """(s_n^dec per n, mean pairwise decoder |cos|, measured L0 on x when the SAE can encode)."""
    s_dec = nth_decoder_projection_scores(sae, x_BD, ns)
    cos = decoder_pairwise_abs_cos(sae)
    l0 = None
    if hasattr(sae, "encode"):
        was_training = getattr(sae, "training", False)
        if hasattr(sae, "eval"):
            sae.eval()
        try:
            acts = sae.encode(x_BD.to(sae.W_dec_LD.device if hasattr(sae, "W_dec_LD") else x_BD.device))
            l0 = float((acts != 0).float().sum(1).mean())
        except Exception:  # an SAE whose inference encoder needs more than x: L0 stays unknown
            l0 = None
        finally:
            if was_training and hasattr(sae, "train"):
                sae.train()
    return s_dec, cos, l0


# ----------------------------------------------------------------------------------------- the sweep
@dataclass
class L0SweepResult:
    data: str
    arch: str
    width: int
    points: list[L0Point]
    recommendation: L0Recommendation
    true_l0: float | None = None  # overall, synthetic data only
    true_l0_first_width: float | None = None  # among the `width` most frequent features
    run_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def recommended_l0(self) -> float:
        return self.recommendation.recommended_l0

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "arch": self.arch,
            "width": self.width,
            "recommended_l0": self.recommended_l0,
            "true_l0": self.true_l0,
            "true_l0_first_width": self.true_l0_first_width,
            "points": [p.to_dict() for p in self.points],
            "recommendation": self.recommendation.to_dict(),
            "run_dir": self.run_dir,
            "config": self.config,
            "wall_seconds": self.wall_seconds,
        }

    def summary_json(self) -> dict[str, Any]:
        """The machine-readable line of `saelab l0 --json`."""
        rec = self.recommendation
        return {
            "recommended_l0": self.recommended_l0,
            "l0": [p.l0_target for p in self.points],
            "l0_measured": [p.l0_measured for p in self.points],
            "n": rec.ns,
            "s_dec": {str(n): [p.s_dec[n] for p in self.points] for n in rec.ns},
            "combined_score": rec.combined_score,
            "decoder_abs_cos": [p.decoder_abs_cos for p in self.points],
            "method": rec.method,
            "valley_l0": rec.valley_l0,
            "knee_l0": rec.knee_l0,
            "argmin_l0": rec.argmin_l0,
            "argmin_decoder_cos_l0": rec.argmin_decoder_cos_l0,
            "floor_l0s": rec.floor_l0s,
            "true_l0": self.true_l0,
            "true_l0_first_width": self.true_l0_first_width,
            "warnings": rec.warnings,
            "ground_truth": {k: [p.ground_truth.get(k) for p in self.points] for k in ("f1", "mcc")}
            if any(p.ground_truth for p in self.points)
            else None,
            "run_dir": self.run_dir,
        }


def score_sweep(
    saes: dict[float, Any],
    x_BD: torch.Tensor,
    ns: Sequence[int],
    names: dict[float, str] | None = None,
) -> list[L0Point]:
    """Score SAEs keyed by target L0 on one evaluation batch."""
    points = []
    for l0, sae in sorted(saes.items()):
        s_dec, cos, measured = score_sae(sae, x_BD, ns)
        points.append(
            L0Point(
                l0_target=float(l0), s_dec=s_dec, decoder_abs_cos=cos, l0_measured=measured, name=(names or {}).get(l0)
            )
        )
    return points


def default_width(handle: Any) -> int:
    """Synthetic: all features up to 1024, else a quarter (SynthSAEBench: 16k → 4096); activations: 8·d_in."""
    model = getattr(handle, "model", None)
    if model is not None:
        F = int(model.num_features)
        return F if F <= 1024 else F // 4
    return 8 * int(handle.d_in)


def run_l0_sweep(
    data: str | Any,
    l0: Sequence[Any],
    arch: str = "batchtopk",
    width: int | None = None,
    samples: int = 2_000_000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    lr_decay_fraction: float = 0.0,
    dead_feature_window: int = 1000,
    seed: int = 0,
    ns: Sequence[int] | None = None,
    score_ns: Sequence[int] | None = None,
    eval_samples: int = 4096,
    gt_eval_samples: int = 20_000,
    tolerance: float = DEFAULT_TOLERANCE,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
    arch_options: dict[str, Any] | None = None,
    plot: bool = True,
    on_point: Callable[[L0Point], None] | None = None,
) -> L0SweepResult:
    """Train one `arch` SAE per L0 on one shared stream, score them, recommend an L0.

    `data`: preset name, synthetic-model folder, activation file, or a `DataHandle`. `ns`: the n
    values the rule uses (default `default_ns`); `score_ns`: extra n values to record. Writes a
    run folder (`run.json`, `saes/`) plus `l0_sweep.json` and `l0_sweep.png` to `out_dir` (a
    temporary folder if None: then nothing is kept).
    """
    import tempfile

    from saelab.diagnostics.data import DataHandle, resolve_data
    from saelab.io import write_json_atomic
    from saelab.runs import RunConfig, run_training
    from saelab.saes.registry import get_sae_class

    started = time.perf_counter()
    handle = data if isinstance(data, DataHandle) else resolve_data(str(data), device=device)
    cls = get_sae_class(arch)
    if width is None:
        width = default_width(handle)
    require(
        isinstance(width, int) and not isinstance(width, bool) and width >= 2, "width", width, "must be an integer ≥ 2"
    )
    from saelab.saes.topk_family import TopKFamilySAE

    l0s = validate_l0_values(l0, width=width, integer=issubclass(cls, TopKFamilySAE))
    require(
        isinstance(eval_samples, int) and eval_samples > 0, "eval_samples", eval_samples, "must be a positive integer"
    )
    use_ns = list(ns) if ns is not None else []
    for n in use_ns:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("n", n, "must be a positive integer")
        if n >= width:
            raise ConfigError("n", n, f"must be smaller than the SAE width {width} (the reference uses n < width/2)")
    all_ns = sorted(set(use_ns or default_ns(l0s, width)) | {int(n) for n in (score_ns or []) if 1 <= int(n) < width})

    cfg = RunConfig(
        data=handle.spec,
        arch=[arch],
        l0=[float(v) for v in l0s],
        width=width,
        samples=samples,
        batch_size=batch_size,
        lr=lr,
        lr_decay_fraction=lr_decay_fraction,
        dead_feature_window=dead_feature_window,
        seed=seed,
        eval_samples=gt_eval_samples,
        device=device,
        arch_options={arch: dict(arch_options or {})},
    )
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="saelab-l0-")
        run_dir = Path(tmp.name)
    else:
        run_dir = Path(out_dir)
    try:
        result = run_training(cfg, run_dir, progress=progress, model=handle.model, source=handle.make_source(seed))
        from saelab.saes.saelens_format import load_sae

        x_eval = handle.eval_batch(eval_samples, seed + 7919).to(device)
        points = []
        for record in result.results:
            sae = load_sae(run_dir / "saes" / record["name"], device=device)
            s_dec, cos, measured = score_sae(sae, x_eval, all_ns)
            gt = {k: record[k] for k in POINT_EVAL_METRICS if k in record}
            point = L0Point(
                l0_target=float(record["l0_target"]),
                s_dec=s_dec,
                decoder_abs_cos=cos,
                l0_measured=record.get("l0", measured),
                name=record["name"],
                ground_truth=gt,
            )
            points.append(point)
            if on_point:
                on_point(point)
        rec = recommend_l0(points, ns=use_ns or None, tolerance=tolerance, d_sae=width)
        history = json.loads((run_dir / "run.json").read_text()).get("history", [])
        rec.warnings += undertraining_warnings(result.results, history, width)
        true_l0 = first = None
        if handle.model is not None:
            true_l0, first = synthetic_true_l0(handle.model, width)
        sweep = L0SweepResult(
            data=handle.spec,
            arch=arch,
            width=width,
            points=points,
            recommendation=rec,
            true_l0=true_l0,
            true_l0_first_width=first,
            run_dir=None if tmp else str(run_dir),
            config={
                **dataclasses.asdict(cfg),
                "ns_fixed": use_ns or None,
                "eval_samples": eval_samples,
                "tolerance": tolerance,
            },
            wall_seconds=time.perf_counter() - started,
        )
        if tmp is None:
            write_json_atomic(run_dir / "l0_sweep.json", sweep.to_dict())
            if plot:
                plot_l0_sweep(sweep, run_dir / "l0_sweep.png")
        return sweep
    finally:
        if tmp is not None:
            tmp.cleanup()


DEAD_FRACTION_LIMIT = 0.01  # an SAE with more dead latents than this share of the width is suspect
EV_GAIN_LIMIT = 0.02  # the sweep's median rise in explained variance over the second half of training


def undertraining_warnings(
    records: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]], width: int
) -> list[str]:
    """Signs that a sweep's SAEs had not finished training (the rule is only as good as the SAEs).

    Undertrained SAEs mislead the rule without any other symptom, so two checks run on every sweep,
    each judged over the whole sweep because single low-L0 SAEs keep improving longest even in a
    good sweep: (1) at least a quarter of the SAEs (and 2) end with more than 1% of latents dead;
    (2) the median SAE's explained variance rose by more than 0.02 between the middle and the end of
    training. Calibrated on sbw-toy, BatchTopK L0 5..25, 2M samples: at lr 3e-4 (recommends 9 for a
    true L0 of 11) 8 of 21 SAEs have dead latents and the median rise is 0.09; at lr 3e-3 (recommends
    12) 2 of 21 and 0.02 or less."""
    warnings = []
    dead = {float(r["l0_target"]): int(r.get("train_stats", {}).get("dead_latents", 0)) for r in records}
    many_dead = {l0: d for l0, d in sorted(dead.items()) if d > DEAD_FRACTION_LIMIT * width}
    if many_dead and len(many_dead) >= max(2, math.ceil(len(records) / 4)):
        listed = ", ".join(f"L0 {l0:g}: {d}" for l0, d in many_dead.items())
        warnings.append(
            f"{len(many_dead)} of {len(records)} SAEs end with more than {DEAD_FRACTION_LIMIT:.0%} of "
            f"their {width} latents dead ({listed}): the SAEs look undertrained (more --samples, a "
            "higher --lr or a shorter --dead-feature-window); the recommendation may be wrong"
        )
    logged = [h for h in history if "eval" not in h]
    gains = {}
    for r in records:
        key = f"{r['name']}/explained_variance"
        ev = [h[key] for h in logged if key in h]
        if len(ev) < 8:
            continue
        middle = ev[len(ev) * 2 // 5 : len(ev) // 2 + 1]
        end = ev[-max(1, len(ev) // 10) :]
        gains[float(r["l0_target"])] = sum(end) / len(end) - sum(middle) / len(middle)
    if gains:
        median = sorted(gains.values())[len(gains) // 2]
        if median > EV_GAIN_LIMIT:
            top = sorted(gains.items(), key=lambda kv: -kv[1])[:5]
            listed = ", ".join(f"L0 {l0:g}: +{g:.3f}" for l0, g in top)
            warnings.append(
                f"explained variance was still rising over the second half of training (median "
                f"+{median:.3f}; largest {listed}): the SAEs look undertrained (more --samples); "
                "the recommendation may be wrong"
            )
    return warnings


def synthetic_true_l0(model: Any, width: int, n_samples: int = 50_000) -> tuple[float, float]:
    """(true L0, L0 among the first `width` features) of a synthetic model."""
    from saelab.synthetic import l0_stats

    w = min(width, int(model.num_features))
    stats = l0_stats(model, n_samples, (w,), seed=4242)
    return float(stats["true_l0"]), float(stats["l0_first"][w])


def load_sweep(path: str | Path) -> L0SweepResult:
    """Read an `l0_sweep.json` written by `run_l0_sweep`."""
    d = json.loads(Path(path).read_text())
    rec = dict(d["recommendation"])
    rec["argmin_l0_by_n"] = {int(n): v for n, v in rec["argmin_l0_by_n"].items()}
    return L0SweepResult(
        data=d["data"],
        arch=d["arch"],
        width=d["width"],
        points=[L0Point.from_dict(p) for p in d["points"]],
        recommendation=L0Recommendation(**rec),
        true_l0=d.get("true_l0"),
        true_l0_first_width=d.get("true_l0_first_width"),
        run_dir=d.get("run_dir"),
        config=d.get("config", {}),
        wall_seconds=d.get("wall_seconds", 0.0),
    )
