"""Finding the correct L0 ("Sparse but Wrong"): sweep L0, score each SAE, recommend one.

Each SAE of the sweep is scored without ground truth (`projection`): the n-th decoder projection
s_n^dec for several n, and the mean pairwise |cos| of its decoder rows.

The recommendation rule (`recommend_l0`):

1. For each n, the curve s_n^dec(L0) is rescaled to [0, 1] over the sweep; the curves are averaged.
2. The valley floor is the run of L0 values around the minimum whose averaged score is within
   `tolerance` (0.05) of the minimum. The recommendation is the floor's *left edge*.
3. n must exceed the true L0 but stay well below d_sae/2, so the n values follow the candidate r:
   n ∈ [1.25 r, 2 r] (capped at 0.45·d_sae), iterated from the middle of the sweep until r is
   self-consistent (cycles settle on their smallest recommendation). `ns=` fixes n instead.

4. If there is no valley — the floor reaches the largest swept L0, s_n^dec still falling — the
   recommendation falls back to the knee of the combined curve (`knee_l0`: break of the best
   two-segment line fit), where the steep, hedging-driven fall ends. On synth-mini (superposition:
   4096 features in 256 dims, width-1024 SAEs) s_n^dec falls all the way to L0 = 30 and only the
   knee lands near the correct L0.

Why the left edge and not the arg-min: below the true L0 gradient pressure makes latents mix
correlated features (hedging) and s_n^dec rises steeply; above it the true features are still a
zero-error solution and the SAE degrades only slowly (degenerate solutions), so the right side of
the valley is shallower and, after finite training, flat within noise. The arg-min wanders over
the flat part; the left edge does not. Why n follows r: at n near d_sae/2 (sbw-toy: n = 25 of 50)
SAEs trained at too high an L0 mix features with negative components, their n-th projection goes
negative and the valley moves to the top of the sweep; at n ≤ true L0 the score measures the
true features' magnitudes, not mixing.

Validation (BatchTopK, `benchmarks/bench_l0_selection.py`, CPU):
* sbw-toy (true L0 10.97), width 50, L0 5..25, 2M samples, lr 3e-3: recommended 12, 11, 11, 11,
  11, 12 for seeds 0–5 (seeds 3–5 held out from the rule's design); the plain arg-min would give
  14, 11, 13, 13, 11, 13; n = 25 = d_sae/2 alone gives 11, 23, 24.
* Undertrained SAEs break it silently: lr 3e-4 for 2M samples recommends 9 (best-MCC SAE at 14).
* synth-mini (L0 of the first 1024 features 12.2), width 1024, 6M samples, lr 1e-3 with decay:
  no valley up to L0 30; the knee fallback gives 10 (sweep 6..20) and 12 (sweep 6..30), seed 0.

Failure modes are reported as warnings: a floor starting at the lowest swept L0 (extend the sweep
down) or reaching the highest (extend up), a shallow valley (undertrained SAEs, or data without a
single correct L0), fewer than 3 points, an n window that could not sit above the candidate
(SAE too narrow), and a window that cycled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.diagnostics.projection import decoder_pairwise_abs_cos, nth_decoder_projection_scores
from saelab.errors import ConfigError, require

DEFAULT_TOLERANCE = 0.05
MIN_RELATIVE_DEPTH = 0.2  # (max − min) / max of s_n^dec below this: "no clear valley"


# ----------------------------------------------------------------------------------------- inputs
def validate_l0_values(values: Sequence[Any], width: int | None = None, integer: bool = True) -> list[int | float]:
    """Sorted unique L0 targets; non-numbers, non-integers (for TopK-style sweeps), values ≤ 0 or
    above the width raise ConfigError naming the value."""
    require(len(values) > 0, "l0", list(values), "give at least one L0 (e.g. --l0 5..25)")
    out: list[int | float] = []
    for v in values:
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ConfigError("l0", v, "must be a number (or a range such as 5..25)") from None
        if not math.isfinite(number):
            raise ConfigError("l0", v, "must be finite")
        if integer and not number.is_integer():
            raise ConfigError("l0", v, "must be an integer: the sweep trains one SAE per whole number of active latents")
        if number <= 0:
            raise ConfigError("l0", v, "must be positive")
        if width is not None and number >= width:
            raise ConfigError("l0", v, f"must be smaller than the SAE width {width}")
        out.append(int(number) if integer else number)
    return sorted(set(out))


N_WINDOW = (1.25, 2.0)  # n ∈ [1.25·r, 2·r] around the candidate L0 r
N_CAP_FRACTION = 0.45  # n ≤ 0.45·d_sae: at n ≈ d_sae/2 the toy's s_n^dec loses its valley


def n_cap(d_sae: int) -> int:
    """Largest n the rule uses: 0.45·d_sae (the reference: "anything below ~d_sae/2 works")."""
    require(isinstance(d_sae, int) and d_sae >= 2, "width", d_sae, "must be an integer ≥ 2")
    return max(1, min(d_sae - 1, int(N_CAP_FRACTION * d_sae)))


def n_window(r: float, d_sae: int) -> list[int]:
    """The n values used when the candidate L0 is r: ⌈1.25 r⌉ … ⌊2 r⌋, capped at `n_cap`."""
    cap = n_cap(d_sae)
    lo, hi = max(1, math.ceil(N_WINDOW[0] * r)), max(1, math.floor(N_WINDOW[1] * r))
    ns = [n for n in range(lo, hi + 1) if n <= cap]
    return ns or [cap]


def default_ns(l0s: Sequence[float], d_sae: int) -> list[int]:
    """Every n the rule may need for a sweep over `l0s` (scored once per SAE; cheap)."""
    cap = n_cap(d_sae)
    hi = min(cap, max(1, math.floor(N_WINDOW[1] * max(l0s))))
    return list(range(1, hi + 1)) if hi >= 1 else [cap]


# ----------------------------------------------------------------------------------------- scoring
@dataclass
class L0Point:
    """One SAE of a sweep."""

    l0_target: float
    s_dec: dict[int, float]
    decoder_abs_cos: float
    l0_measured: float | None = None
    name: str | None = None
    ground_truth: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "l0_target": self.l0_target,
            "l0_measured": self.l0_measured,
            "s_dec": {str(n): v for n, v in self.s_dec.items()},
            "decoder_abs_cos": self.decoder_abs_cos,
            **({"ground_truth": self.ground_truth} if self.ground_truth else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> L0Point:
        return cls(
            l0_target=float(d["l0_target"]),
            s_dec={int(n): float(v) for n, v in d["s_dec"].items()},
            decoder_abs_cos=float(d["decoder_abs_cos"]),
            l0_measured=d.get("l0_measured"),
            name=d.get("name"),
            ground_truth=dict(d.get("ground_truth", {})),
        )


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


# ----------------------------------------------------------------------------------------- the rule
@dataclass
class L0Recommendation:
    recommended_l0: float
    rule: str
    ns: list[int]
    combined_score: list[float]
    floor_l0s: list[float]
    argmin_l0: float
    argmin_l0_by_n: dict[int, float]
    argmin_decoder_cos_l0: float | None
    relative_depth: float
    tolerance: float
    warnings: list[str] = field(default_factory=list)
    method: str = "valley"  # "valley" (left edge of the floor) or "knee" (fallback: no valley in the sweep)
    valley_l0: float | None = None
    knee_l0: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["argmin_l0_by_n"] = {str(n): v for n, v in self.argmin_l0_by_n.items()}
        return d


def recommend_l0(
    points: Sequence[L0Point],
    ns: Sequence[int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    d_sae: int | None = None,
    max_iterations: int = 10,
) -> L0Recommendation:
    """Apply the rule in the module docstring to a scored sweep.

    `ns` fixes the n values; by default they follow the candidate: starting from the middle of the
    sweep, n ∈ [1.25 r, 2 r] (≤ 0.45·d_sae) for the current candidate r, until r is self-consistent
    (a cycle settles on its smallest recommendation, as the left-edge rule does)."""
    require(len(points) >= 1, "points", len(points), "need at least one scored SAE")
    pts = sorted(points, key=lambda p: p.l0_target)
    l0s = [p.l0_target for p in pts]
    require(len(set(l0s)) == len(l0s), "l0", l0s, "each L0 may appear only once in a sweep")
    available = set.intersection(*(set(p.s_dec) for p in pts))
    if ns is not None:
        return _recommend_fixed(pts, [int(n) for n in ns], tolerance, d_sae, available, adaptive=False)
    if d_sae is None:
        d_sae = max(available) * 2 + 1 if available else 2
    r = l0s[(len(l0s) - 1) // 2]
    tried: list[tuple[float, L0Recommendation]] = []
    for _ in range(max_iterations):
        ns_r = [n for n in n_window(r, d_sae) if n in available] or [max(available)]
        rec = _recommend_fixed(pts, ns_r, tolerance, d_sae, available, adaptive=True)
        if rec.recommended_l0 == r:
            return rec
        seen = [c for c, _ in tried]
        tried.append((r, rec))
        if rec.recommended_l0 in seen:  # a cycle: settle on its smallest recommendation
            cycle = tried[seen.index(rec.recommended_l0):]
            best = min((x for _, x in cycle), key=lambda x: x.recommended_l0)
            best.warnings.append("the self-consistent n window cycled between L0s "
                                 f"{sorted({c for c, _ in cycle})}; took the smallest recommendation")
            return best
        r = rec.recommended_l0
    rec = tried[-1][1]
    rec.warnings.append(f"the self-consistent n window did not settle in {max_iterations} iterations")
    return rec


def _recommend_fixed(
    pts: list[L0Point], ns: list[int], tolerance: float, d_sae: int | None, available: set[int], adaptive: bool
) -> L0Recommendation:
    require(0 <= tolerance < 1, "tolerance", tolerance, "must be in [0, 1)")
    missing = [n for n in ns if n not in available]
    require(not missing, "n", missing, "were not scored for every SAE of the sweep")
    require(len(ns) > 0, "n", ns, "no n to score with")
    l0s = [p.l0_target for p in pts]
    warnings: list[str] = []

    combined = [0.0] * len(pts)
    depths = []
    for n in ns:
        vals = [p.s_dec[n] for p in pts]
        lo, hi = min(vals), max(vals)
        span = hi - lo
        depths.append(span / max(abs(hi), abs(lo), 1e-12))
        for i, v in enumerate(vals):
            combined[i] += (v - lo) / span if span > 0 else 0.0
    combined = [c / len(ns) for c in combined]
    i_min = min(range(len(pts)), key=lambda i: (combined[i], i))
    floor_cut = combined[i_min] + tolerance
    left = i_min
    while left > 0 and combined[left - 1] <= floor_cut:
        left -= 1
    right = i_min
    while right < len(pts) - 1 and combined[right + 1] <= floor_cut:
        right += 1
    valley = l0s[left]
    knee = knee_l0(l0s, combined)
    no_valley = right == len(pts) - 1 and len(pts) >= 2
    method = "knee" if no_valley and knee is not None else "valley"
    recommended = knee if method == "knee" else valley
    relative_depth = float(sum(depths) / len(depths))
    argmin_by_n = {n: l0s[min(range(len(pts)), key=lambda i: (pts[i].s_dec[n], i))] for n in ns}
    cos_vals = [p.decoder_abs_cos for p in pts]
    argmin_cos = l0s[min(range(len(pts)), key=lambda i: (cos_vals[i], i))]

    if len(pts) < 3:
        warnings.append(f"only {len(pts)} L0 value(s): a valley needs at least 3; sweep more L0 values")
    elif left == 0:
        warnings.append(
            f"the valley floor starts at the smallest swept L0 ({l0s[0]:g}): the correct L0 may be lower; extend the sweep down"
        )
    elif no_valley:
        warnings.append(
            f"no valley: the floor reaches the largest swept L0 ({l0s[-1]:g}) and s_n^dec may still be falling; "
            + (f"recommending the knee (end of the steep fall) at {knee:g} instead of the valley edge {valley:g}; "
               if method == "knee" else "")
            + "extend the sweep up to look for a valley"
        )
    if relative_depth < MIN_RELATIVE_DEPTH:
        warnings.append(
            f"shallow valley (s_n^dec varies by only {100 * relative_depth:.0f}% over the sweep): train longer or "
            "check that the data has a single well-defined L0"
        )
    if min(ns) <= recommended:
        warnings.append(f"n={min(ns)} is not above the recommended L0 {recommended:g}: s_n^dec needs n > true L0; "
                        "a wider SAE allows larger n")
    if d_sae is not None and max(ns) >= d_sae / 2:
        warnings.append(f"n={max(ns)} is at least d_sae/2={d_sae / 2:g}, where s_n^dec loses its valley")
    window = f"n = {ns[0]}..{ns[-1]} (self-consistent window [1.25, 2]×L0)" if adaptive else f"n = {ns}"
    what = ("left edge of the valley floor" if method == "valley"
            else "knee (2-segment fit) — no valley in the sweep —")
    return L0Recommendation(
        recommended_l0=recommended,
        rule=f"{what} of the mean normalised s_n^dec, {window}, tolerance {tolerance:g}",
        ns=list(ns),
        combined_score=combined,
        floor_l0s=l0s[left : right + 1],
        argmin_l0=l0s[i_min],
        argmin_l0_by_n=argmin_by_n,
        argmin_decoder_cos_l0=argmin_cos,
        relative_depth=relative_depth,
        tolerance=tolerance,
        warnings=warnings,
        method=method,
        valley_l0=valley,
        knee_l0=knee,
    )


def knee_l0(l0s: Sequence[float], scores: Sequence[float]) -> float | None:
    """Where a falling curve stops falling steeply: the break of the best continuous two-segment
    least-squares line fit, the break placed at an interior swept L0. None with fewer than 4
    points or when the left segment is not steeper downward than the right one (no knee)."""
    if len(l0s) < 4:
        return None
    x = torch.tensor([float(v) for v in l0s], dtype=torch.float64)
    y = torch.tensor([float(v) for v in scores], dtype=torch.float64)
    best: tuple[float, float, float, float] | None = None
    for i in range(1, len(l0s) - 1):
        b = x[i]
        A = torch.stack([torch.ones_like(x), (x - b).clamp(max=0), (x - b).clamp(min=0)], 1)
        coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
        sse = float(((A @ coef - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-15:
            best = (sse, float(b), float(coef[1]), float(coef[2]))
    assert best is not None
    _, b, left_slope, right_slope = best
    if not (left_slope < 0 and left_slope < right_slope):
        return None
    return b


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
            if any(p.ground_truth for p in self.points) else None,
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
        points.append(L0Point(l0_target=float(l0), s_dec=s_dec, decoder_abs_cos=cos, l0_measured=measured,
                              name=(names or {}).get(l0)))
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
    from saelab.saes.base import get_sae_class
    from saelab.training.run import RunConfig, run_training

    started = time.perf_counter()
    handle = data if isinstance(data, DataHandle) else resolve_data(str(data), device=device)
    cls = get_sae_class(arch)
    if width is None:
        width = default_width(handle)
    require(isinstance(width, int) and not isinstance(width, bool) and width >= 2, "width", width,
            "must be an integer ≥ 2")
    from saelab.saes.topk_family import TopKFamilySAE

    l0s = validate_l0_values(l0, width=width, integer=issubclass(cls, TopKFamilySAE))
    require(isinstance(eval_samples, int) and eval_samples > 0, "eval_samples", eval_samples, "must be a positive integer")
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
            gt = {k: record[k] for k in ("f1", "mcc", "precision", "recall", "explained_variance") if k in record}
            point = L0Point(l0_target=float(record["l0_target"]), s_dec=s_dec, decoder_abs_cos=cos,
                            l0_measured=record.get("l0", measured), name=record["name"], ground_truth=gt)
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
            data=handle.spec, arch=arch, width=width, points=points, recommendation=rec, true_l0=true_l0,
            true_l0_first_width=first, run_dir=None if tmp else str(run_dir),
            config={**dataclasses.asdict(cfg), "ns_fixed": use_ns or None, "eval_samples": eval_samples,
                    "tolerance": tolerance},
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


def undertraining_warnings(records: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]],
                           width: int) -> list[str]:
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
        warnings.append(f"{len(many_dead)} of {len(records)} SAEs end with more than {DEAD_FRACTION_LIMIT:.0%} of "
                        f"their {width} latents dead ({listed}): the SAEs look undertrained (more --samples, a "
                        "higher --lr or a shorter --dead-feature-window); the recommendation may be wrong")
    logged = [h for h in history if "eval" not in h]
    gains = {}
    for r in records:
        key = f"{r['name']}/explained_variance"
        ev = [h[key] for h in logged if key in h]
        if len(ev) < 8:
            continue
        middle = ev[len(ev) * 2 // 5: len(ev) // 2 + 1]
        end = ev[-max(1, len(ev) // 10):]
        gains[float(r["l0_target"])] = sum(end) / len(end) - sum(middle) / len(middle)
    if gains:
        median = sorted(gains.values())[len(gains) // 2]
        if median > EV_GAIN_LIMIT:
            top = sorted(gains.items(), key=lambda kv: -kv[1])[:5]
            listed = ", ".join(f"L0 {l0:g}: +{g:.3f}" for l0, g in top)
            warnings.append(f"explained variance was still rising over the second half of training (median "
                            f"+{median:.3f}; largest {listed}): the SAEs look undertrained (more --samples); "
                            "the recommendation may be wrong")
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
        data=d["data"], arch=d["arch"], width=d["width"], points=[L0Point.from_dict(p) for p in d["points"]],
        recommendation=L0Recommendation(**rec), true_l0=d.get("true_l0"),
        true_l0_first_width=d.get("true_l0_first_width"), run_dir=d.get("run_dir"), config=d.get("config", {}),
        wall_seconds=d.get("wall_seconds", 0.0),
    )


# ----------------------------------------------------------------------------------------- plot
def plot_l0_sweep(sweep: L0SweepResult, path: str | Path) -> Path:
    """Both metrics against L0, with the recommendation (and true L0 when known) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saelab.io import save_figure_atomic

    rec = sweep.recommendation
    l0s = [p.l0_target for p in sweep.points]
    has_gt = any("mcc" in p.ground_truth for p in sweep.points)
    ncols = 3 if has_gt else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2))
    ax = axes[0]
    cmap = plt.get_cmap("viridis")
    for j, n in enumerate(rec.ns):
        ax.plot(l0s, [p.s_dec[n] for p in sweep.points], marker=".", color=cmap(j / max(1, len(rec.ns) - 1)),
                label=f"n={n}")
    ax.set_title("n-th decoder projection $s_n^{dec}$")
    ax.set_xlabel("SAE L0 (target active latents per input)")
    ax.set_ylabel("$s_n^{dec}$ (projection, input units)")
    ax2 = axes[1]
    ax2.plot(l0s, [p.decoder_abs_cos for p in sweep.points], marker="o", color="tab:red", label="decoder mean |cos|")
    ax2.set_title("Mean pairwise |cos| of decoder rows")
    ax2.set_xlabel("SAE L0 (target active latents per input)")
    ax2.set_ylabel("mean |cos| (unitless)")
    ax2b = ax2.twinx()
    ax2b.plot(l0s, rec.combined_score, marker="s", color="tab:blue", alpha=0.6, label="combined $s_n^{dec}$ score")
    ax2b.set_ylabel("combined normalised $s_n^{dec}$ (0 = valley)")
    axes_to_mark = list(axes)
    if has_gt:
        ax3 = axes[2]
        ax3.plot(l0s, [p.ground_truth.get("mcc") for p in sweep.points], marker="o", label="MCC")
        ax3.plot(l0s, [p.ground_truth.get("f1") for p in sweep.points], marker="o", label="F1")
        ax3.set_title("Ground truth (synthetic data)")
        ax3.set_xlabel("SAE L0 (target active latents per input)")
        ax3.set_ylabel("score (0–1)")
    for a in axes_to_mark:
        a.axvline(rec.recommended_l0, color="black", linestyle="--", label=f"recommended L0 = {rec.recommended_l0:g}")
        if sweep.true_l0_first_width is not None:
            a.axvline(sweep.true_l0_first_width, color="tab:green", linestyle=":",
                      label=f"true L0 (first {sweep.width} features) = {sweep.true_l0_first_width:.1f}")
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    if has_gt:
        axes[2].legend(fontsize=7)
    fig.suptitle(f"L0 sweep: {sweep.arch} width {sweep.width} on {sweep.data}")
    fig.tight_layout()
    return save_figure_atomic(fig, path)


# ----------------------------------------------------------------------------------------- mechanism
@torch.no_grad()
def feature_mixing(W_dec_LD: torch.Tensor, feats_FD: torch.Tensor) -> dict[str, float]:
    """For an SAE whose latent j was initialised at feature j: mean cos(d̂_j, f_j) ('self'), mean
    mixing 1 − cos² (the share of the decoder row off its own feature), and the mean |cos| of d̂_j
    with the other features (baseline: the features' own mean |cos|)."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L = min(d.shape[0], f.shape[0])
    c = d[:L] @ f.T
    self_cos = c[torch.arange(L), torch.arange(L)]
    off = c.abs()
    off[torch.arange(L), torch.arange(L)] = 0.0
    return {
        "self_cos": float(self_cos.mean()),
        "mixing": float((1 - self_cos**2).mean()),
        "off_target_abs_cos": float(off.sum() / (L * (f.shape[0] - 1))),
    }


def ground_truth_init_drift(
    model: Any,
    l0s: Sequence[int] = (5, 11),
    samples: int = 1_000_000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 100,
    arch: str = "batchtopk",
) -> dict[float, list[dict[str, float]]]:
    """The "Sparse but Wrong" mechanism: SAEs (width = number of true features) initialised exactly
    at the true features and trained at each L0. Returns, per L0, the trajectory of
    `feature_mixing` (step 0 included): too low an L0 drifts away from the features, the true L0 stays."""
    from saelab.diagnostics.data import ModelStream
    from saelab.saes.base import get_sae_class
    from saelab.training.trainer import TrainConfig, Trainer

    feats = model.feature_vectors_FD.detach().float()
    F, D = feats.shape
    cls = get_sae_class(arch)
    saes = {}
    for l0 in l0s:
        cfg = cls.config_for_l0(D, F, float(l0), max(1, samples // batch_size))
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec_LD.copy_(feats)
            sae.W_enc_DL.copy_(feats.T)
            sae.b_enc_L.zero_()
            sae.b_dec_D.copy_(model.bias_D.detach().float())
        saes[f"l0_{l0:g}"] = sae
    history: dict[float, list[dict[str, float]]] = {float(l0): [] for l0 in l0s}

    def record(step: int, current: dict[str, Any]) -> dict[str, dict[str, float]]:
        out = {}
        for l0 in l0s:
            m = feature_mixing(current[f"l0_{l0:g}"].W_dec_LD, feats)
            history[float(l0)].append({"step": step, **m})
            out[f"l0_{l0:g}"] = m
        return out

    record(0, saes)
    trainer = Trainer(saes, ModelStream(model, seed), TrainConfig(samples=samples, batch_size=batch_size, lr=lr,
                                                                  seed=seed),
                      eval_fn=None, progress=False)
    trainer.eval_fn = lambda current: record(trainer.step, current)
    trainer.eval_every = eval_every
    trainer.train()
    record(trainer.step, trainer.saes)
    return history
