"""How much superposition fits in d dimensions (post "How much superposition is there?", §3 of the spec).

For N random unit vectors in R^d, cos²θ of a pair is Beta(½, (d−1)/2), so
P(|cos| ≤ t) = I_{t²}(½, (d−1)/2) (regularised incomplete beta). Treating the N−1 pairs of one
vector as independent, the expected mean-max |cos| ("worst-case interference per vector") is

    E[ρ_mm] = ∫₀¹ (1 − I_{t²}(½, (d−1)/2)^{N−1}) dt          (`expected_mean_max_abs_cos`)

with the leading-order approximation √(2 ln N / d) and the spherical-cap (optimal packing)
bound √(1 − N^{−2/(d−1)}). `vectors_for_interference` inverts the closed form (how many vectors
fit under a given interference) and `simulate_mean_max_abs_cos` checks it by sampling.

Numerics: the power is evaluated as exp((N−1)·log1p(−Q)) with Q = 1 − I (scipy's `betaincc`), so
N up to ~10^300 works; the integral is split at the transition t* where (N−1)·Q(t*) = 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from saelab.errors import ConfigError, require
from saelab.plotting import FILE_DPI, new_figure, save_figure

MAX_LOG10_N = 300.0
DEFAULT_N_LADDER = (4096, 16_384, 10**5, 10**7, 10**9, 10**11, 10**13)
DEFAULT_INTERFERENCES = (0.05, 0.10, 0.15, 0.20)
MAX_SIM_ELEMENTS = 100_000_000  # N·d floats held for a simulation (~400 MB)


def _brentq(f: Callable[[float], float], a: float, b: float, *, xtol: float, rtol: float, maxiter: int) -> float:
    """scipy's `brentq` root of f in [a, b], typed: scipy ships no annotations, so pyright infers
    `rtol: float64` from its default and a tuple result (that is only with full_output=True)."""
    from scipy.optimize import brentq

    root = brentq(f, a, b, xtol=xtol, rtol=rtol, maxiter=maxiter)  # pyright: ignore[reportArgumentType]
    return cast(float, root)


def _check_d(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 2:
        raise ConfigError("d", d, "must be an integer ≥ 2 (the dimension of the space)")
    return int(d)


def _check_n(n: Any, field: str = "n") -> float:
    """N as a float (it may be astronomically large); integers ≥ 2 only."""
    if isinstance(n, bool):
        raise ConfigError(field, n, "must be an integer ≥ 2 (the number of vectors)")
    try:
        value = float(n)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(field, n, "must be an integer ≥ 2 (the number of vectors)") from None
    if not math.isfinite(value) or value < 2 or (value < 2**53 and not value.is_integer()):
        raise ConfigError(field, n, "must be an integer ≥ 2 (the number of vectors)")
    if math.log10(value) > MAX_LOG10_N:
        raise ConfigError(field, n, f"must be at most 10^{MAX_LOG10_N:g}")
    return value


def parse_big_count(text: str | int | float, field: str = "n") -> float:
    """'16384', '16k', '1e13', '10^13', '10**13' → a float count (exact below 2^53)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _check_n(text, field)
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:\^|\*\*)\s*(\d+(?:\.\d+)?)", s)
    try:
        if m:
            value = float(m.group(1)) ** float(m.group(2))
        else:
            mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(s[-1:], 1.0)
            value = float(s[:-1] if mult != 1.0 else s) * mult
    except (ValueError, OverflowError):
        raise ConfigError(field, text, "must be a count such as 16384, 16k, 1e13 or 10^13") from None
    return _check_n(value, field)


def _tail(t: np.ndarray | float, d: int) -> np.ndarray:
    """Q(t) = P(|cos| > t) = 1 − I_{t²}(½, (d−1)/2)."""
    from scipy.special import betaincc

    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    return betaincc(0.5, (d - 1) / 2.0, t * t)


def _integrand(t: float, d: int, n: float) -> float:
    q = float(_tail(t, d))
    if q >= 1.0:
        return 1.0
    return float(-np.expm1((n - 1.0) * np.log1p(-q)))


def _transition(d: int, n: float) -> float:
    """t* with (N−1)·Q(t*) = 1 (where the integrand falls from ≈1 to ≈0)."""
    log_m = math.log(n - 1.0)

    def f(t: float) -> float:
        q = float(_tail(t, d))
        return log_m + math.log(max(q, 1e-320))

    if f(1e-12) <= 0:
        return 0.0
    if f(1.0 - 1e-15) >= 0:
        return 1.0
    return _brentq(f, 1e-12, 1.0 - 1e-15, xtol=1e-14, rtol=1e-12, maxiter=500)


def expected_mean_max_abs_cos(d: int, n: float | int) -> float:
    """E[mean over vectors of the max |cos| with the other N−1] for N random unit vectors in R^d."""
    return _expected(_check_d(d), _check_n(n))


def _expected(d: int, n: float) -> float:
    """The closed form for any real N > 1 (no input checks; used by the inverse)."""
    from scipy.integrate import quad

    t_star = _transition(d, n)
    # scale of the transition: the integrand goes 1 → 0 over a few 1/(d·t*) around t*
    width = min(0.5, 8.0 / (d * max(t_star, 1e-6)) + 1e-4)
    lo, hi = max(0.0, t_star - width), min(1.0, t_star + width)
    kwargs: dict[str, Any] = {"args": (d, n), "limit": 400, "epsabs": 1e-12, "epsrel": 1e-10}
    total = lo  # integrand is 1 (to double precision) on [0, lo) when lo is well below t*
    if lo > 0:
        head, _ = quad(_integrand, 0.0, lo, **kwargs)
        total = head
    mid, _ = quad(_integrand, lo, hi, points=[t_star] if lo < t_star < hi else None, **kwargs)
    tail = 0.0
    if hi < 1.0:
        tail, _ = quad(_integrand, hi, 1.0, **kwargs)
    return float(total + mid + tail)


def approximation(d: int, n: float | int) -> float:
    """Leading order: √(2 ln N / d)."""
    d, n = _check_d(d), _check_n(n)
    return math.sqrt(2.0 * math.log(n) / d)


def cap_bound(d: int, n: float | int) -> float:
    """Optimal-packing estimate √(1 − N^{−2/(d−1)}) (spherical caps)."""
    d, n = _check_d(d), _check_n(n)
    return math.sqrt(-math.expm1(-2.0 * math.log(n) / (d - 1)))


def vectors_for_interference(d: int, interference: float) -> float:
    """N at which E[ρ_mm] reaches `interference` for random vectors in R^d (real-valued; < 2 means
    even two random vectors interfere more). Returns ∞ beyond 10^300."""
    d = _check_d(d)
    if isinstance(interference, bool) or not isinstance(interference, (int, float)) or not 0 < interference < 1:
        raise ConfigError("interference", interference, "must be a number in (0, 1)")
    f2 = _expected(d, 2.0)
    if interference <= f2:
        # below two vectors: solve on the continuous extension N ∈ (1, 2] for a readable answer
        return 1.0 + max(0.0, interference / f2)
    if _expected(d, 10.0**MAX_LOG10_N) < interference:
        return math.inf
    x = _brentq(
        lambda lx: _expected(d, 10.0**lx) - interference,
        math.log10(2.0),
        MAX_LOG10_N,
        xtol=1e-6,
        rtol=1e-10,
        maxiter=200,
    )
    return 10.0**x


@torch.no_grad()
def simulate_mean_max_abs_cos(
    d: int, n: int, queries: int = 2048, seed: int = 0, chunk_size: int = 4096
) -> tuple[float, float]:
    """(estimate, standard error) of E[ρ_mm] by sampling N random unit vectors in R^d and taking,
    for `queries` of them, the max |cos| with all the others (an unbiased estimate of the mean)."""
    d = _check_d(d)
    n_f = _check_n(n)
    require(
        n_f * d <= MAX_SIM_ELEMENTS,
        "n",
        n,
        f"too large to simulate in d={d} (N·d must be ≤ {MAX_SIM_ELEMENTS:.0e}); use the closed form",
    )
    n = int(n_f)
    require(isinstance(queries, int) and queries >= 1, "queries", queries, "must be a positive integer")
    q = min(queries, n)
    g = torch.Generator().manual_seed(int(seed))
    V = torch.randn(n, d, generator=g)
    V /= V.norm(dim=1, keepdim=True)
    query_idx = torch.randperm(n, generator=g)[:q]
    maxes = torch.empty(q)
    Q = V[query_idx]
    for start in range(0, q, chunk_size):
        stop = min(q, start + chunk_size)
        cos = (Q[start:stop] @ V.T).abs_()
        cos[torch.arange(stop - start), query_idx[start:stop]] = 0.0
        maxes[start:stop] = cos.max(dim=1).values
    est = float(maxes.double().mean())
    stderr = float(maxes.double().std() / math.sqrt(q)) if q > 1 else float("nan")
    return est, stderr


@dataclass
class SuperpositionReport:
    d: int
    n: float
    expected_mean_max_abs_cos: float
    approximation: float
    cap_bound: float
    simulated: float | None
    simulated_stderr: float | None
    ladder: list[dict[str, float]]
    inverse: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "d": self.d,
            "n": int(self.n) if self.n < 2**53 else self.n,
            "expected_mean_max_abs_cos": self.expected_mean_max_abs_cos,
            "approximation": self.approximation,
            "cap_bound": self.cap_bound,
            "ladder": self.ladder,
            "inverse": self.inverse,
        }
        if self.simulated is not None:
            d["simulated"] = self.simulated
            d["simulated_stderr"] = self.simulated_stderr
        return d


def superposition_report(
    d: int,
    n: float | int,
    simulate: bool = False,
    queries: int = 2048,
    seed: int = 0,
    ladder: tuple[float, ...] | list[float] = DEFAULT_N_LADDER,
    interferences: tuple[float, ...] | list[float] = DEFAULT_INTERFERENCES,
) -> SuperpositionReport:
    """Everything `saelab theory superposition` prints."""
    d, n = _check_d(d), _check_n(n)
    sim = stderr = None
    if simulate:
        sim, stderr = simulate_mean_max_abs_cos(d, int(n), queries=queries, seed=seed)
    rows = []
    for m in sorted(set(float(x) for x in ladder) | {n}):
        rows.append(
            {
                "n": m,
                "log10_n": math.log10(m),
                "expected_mean_max_abs_cos": expected_mean_max_abs_cos(d, m),
                "approximation": approximation(d, m),
                "cap_bound": cap_bound(d, m),
            }
        )
    inverse = []
    for eps in interferences:
        nv = vectors_for_interference(d, eps)
        inverse.append(
            {
                "max_interference": eps,
                "n_vectors": nv,
                "log10_n_vectors": math.log10(nv) if math.isfinite(nv) else math.inf,
            }
        )
    return SuperpositionReport(
        d=d,
        n=n,
        expected_mean_max_abs_cos=expected_mean_max_abs_cos(d, n),
        approximation=approximation(d, n),
        cap_bound=cap_bound(d, n),
        simulated=sim,
        simulated_stderr=stderr,
        ladder=rows,
        inverse=inverse,
    )


def plot_superposition(report: SuperpositionReport, path: str, extra_dims: tuple[int, ...] = ()) -> str:
    """E[ρ_mm] against N (closed form, approximation, cap bound, simulation) for the report's d."""
    d = report.d
    top = max(13.0, math.log10(report.n) + 1)
    xs = np.linspace(math.log10(2.0), top, 80)
    fig = new_figure(7, 4.5, dpi=FILE_DPI)
    ax = fig.subplots()
    dims = [d] + [e for e in extra_dims if e != d]
    for j, dd in enumerate(dims):
        ys = [_expected(dd, float(10.0**x)) for x in xs]
        style = "-" if j == 0 else "--"
        ax.plot(10.0**xs, ys, style, label=f"closed form, d={dd}")
    ax.plot(10.0**xs, np.sqrt(2.0 * np.log(10.0**xs) / d), ":", color="gray", label=f"√(2 ln N / d), d={d}")
    ax.plot(
        10.0**xs,
        np.sqrt(-np.expm1(-2.0 * np.log(10.0**xs) / (d - 1))),
        "-.",
        color="tab:purple",
        alpha=0.7,
        label=f"cap bound √(1−N^(−2/(d−1))), d={d}",
    )
    ax.scatter(
        [report.n],
        [report.expected_mean_max_abs_cos],
        color="black",
        zorder=5,
        label=f"N={report.n:.6g}: {report.expected_mean_max_abs_cos:.4f}",
    )
    if report.simulated is not None:
        ax.errorbar(
            [report.n],
            [report.simulated],
            yerr=[2 * (report.simulated_stderr or 0)],
            fmt="x",
            color="tab:red",
            capsize=4,
            zorder=6,
            label=f"simulated: {report.simulated:.4f}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("number of vectors N (log scale)")
    ax.set_ylabel("expected mean-max |cos| (unitless)")
    ax.set_title(f"Interference of N random unit vectors in d={d} dimensions")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return str(save_figure(fig, path))
