"""The L0 recommendation rule ("Sparse but Wrong"): from a scored L0 sweep to one L0.

Each SAE of a sweep is scored without ground truth (`l0_sweep.score_sae`): the n-th decoder
projection s_n^dec for several n, and the mean pairwise |cos| of its decoder rows. The rule
(`recommend_l0`):

1. For each n, the curve s_n^dec(L0) is rescaled to [0, 1] over the sweep; the curves are averaged.
2. The valley floor is the run of L0 values around the minimum whose averaged score is within
   `tolerance` (0.05) of the minimum. The recommendation is the floor's *left edge*.
3. n must exceed the true L0 but stay well below d_sae/2, so the n values follow the candidate r:
   n ∈ [1.25 r, 2 r] (capped at 0.45·d_sae), iterated from the middle of the sweep until r is
   self-consistent (cycles settle on their smallest recommendation). `ns=` fixes n instead.
4. If there is no valley — the floor reaches the largest swept L0, s_n^dec still falling — the
   recommendation falls back to the knee of the combined curve (`knee_l0`: break of the best
   two-segment line fit), where the steep, hedging-driven fall ends. Under heavy superposition
   s_n^dec can fall all the way to the top of a sweep; then only the knee lands near the correct L0.

Why the left edge and not the arg-min: below the true L0 gradient pressure makes latents mix
correlated features (hedging) and s_n^dec rises steeply; above it the true features are still a
zero-error solution and the SAE degrades only slowly (degenerate solutions), so the right side of
the valley is shallower and, after finite training, flat within noise. The arg-min wanders over
the flat part; the left edge does not. Why n follows r: at n near d_sae/2 SAEs trained at too high
an L0 mix features with negative components, their n-th projection goes negative and the valley
moves to the top of the sweep; at n ≤ true L0 the score measures the true features' magnitudes,
not mixing. Measurements behind these choices: docs/l0_selection.md.

Failure modes are reported as warnings: a floor starting at the lowest swept L0 (extend the sweep
down) or reaching the highest (extend up), a shallow valley (undertrained SAEs, or data without a
single correct L0), fewer than 3 points, an n window that could not sit above the candidate
(SAE too narrow), and a window that cycled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
            raise ConfigError(
                "l0", v, "must be an integer: the sweep trains one SAE per whole number of active latents"
            )
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


# ----------------------------------------------------------------------------------------- scored SAEs
@dataclass
class L0Point:
    """One scored SAE of a sweep: the rule's input."""

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
            cycle = tried[seen.index(rec.recommended_l0) :]
            best = min((x for _, x in cycle), key=lambda x: x.recommended_l0)
            best.warnings.append(
                "the self-consistent n window cycled between L0s "
                f"{sorted({c for c, _ in cycle})}; took the smallest recommendation"
            )
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
    recommended = knee if method == "knee" and knee is not None else valley  # "knee" implies a knee
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
            + (
                f"recommending the knee (end of the steep fall) at {knee:g} instead of the valley edge {valley:g}; "
                if method == "knee"
                else ""
            )
            + "extend the sweep up to look for a valley"
        )
    if relative_depth < MIN_RELATIVE_DEPTH:
        warnings.append(
            f"shallow valley (s_n^dec varies by only {100 * relative_depth:.0f}% over the sweep): train longer or "
            "check that the data has a single well-defined L0"
        )
    if min(ns) <= recommended:
        warnings.append(
            f"n={min(ns)} is not above the recommended L0 {recommended:g}: s_n^dec needs n > true L0; "
            "a wider SAE allows larger n"
        )
    if d_sae is not None and max(ns) >= d_sae / 2:
        warnings.append(f"n={max(ns)} is at least d_sae/2={d_sae / 2:g}, where s_n^dec loses its valley")
    window = f"n = {ns[0]}..{ns[-1]} (self-consistent window [1.25, 2]×L0)" if adaptive else f"n = {ns}"
    what = "left edge of the valley floor" if method == "valley" else "knee (2-segment fit) — no valley in the sweep —"
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
