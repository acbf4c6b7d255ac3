"""Statistics of synthetic models: true L0, superposition, firing rates, hierarchy shape.

Sampling-based statistics draw from a separate stream (`seed`, `SyntheticModel.forked_stream`),
leaving the model's own sampling stream where it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from saelab.errors import ConfigError, require
from saelab.synthetic.model import SyntheticModel


def _check_samples(n_samples: int, batch_size: int) -> None:
    require(isinstance(n_samples, int) and n_samples >= 1, "n_samples", n_samples, "must be a positive integer")
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "must be a positive integer")


@torch.no_grad()
def l0_stats(
    model: SyntheticModel,
    n_samples: int = 100_000,
    widths: Sequence[int] = (),
    batch_size: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """One pass: true L0 (mean active features per sample), its standard error, L0 among the
    first `w` features for each width, and the empirical firing-rate range."""
    _check_samples(n_samples, batch_size)
    for w in widths:
        require(
            isinstance(w, int) and 1 <= w <= model.num_features, "width", w, f"must be in [1, {model.num_features}]"
        )
    total = 0
    sum_l0 = 0.0
    sum_l0_sq = 0.0
    first = {w: 0.0 for w in widths}
    counts_F = torch.zeros(model.num_features, dtype=torch.float64, device=model.device)
    with model.forked_stream(seed):
        while total < n_samples:
            bs = min(batch_size, n_samples - total)
            acts = model.sample_features_sparse(bs)
            per = acts.l0_per_sample().to(torch.float64)
            sum_l0 += float(per.sum())
            sum_l0_sq += float((per * per).sum())
            for w in widths:
                first[w] += float((acts.feature_idx < w).sum())
            counts_F += torch.bincount(acts.feature_idx, minlength=model.num_features).to(torch.float64)
            total += bs
    mean = sum_l0 / total
    var = max(sum_l0_sq / total - mean * mean, 0.0)
    rates = counts_F / total
    return {
        "n_samples": total,
        "true_l0": mean,
        "true_l0_stderr": math.sqrt(var / total),
        "l0_first": {w: first[w] / total for w in widths},
        "empirical_firing_rate_min": float(rates.min()),
        "empirical_firing_rate_max": float(rates.max()),
    }


def true_l0(model: SyntheticModel, n_samples: int = 100_000, batch_size: int = 4096, seed: int = 0) -> float:
    """Mean number of active ground-truth features per sample."""
    return l0_stats(model, n_samples, (), batch_size, seed)["true_l0"]


def l0_of_first(
    model: SyntheticModel, width: int, n_samples: int = 100_000, batch_size: int = 4096, seed: int = 0
) -> float:
    """Mean number of active features among features 0..width-1 (the most frequent ones)."""
    return l0_stats(model, n_samples, (width,), batch_size, seed)["l0_first"][width]


@torch.no_grad()
def empirical_firing_rates(
    model: SyntheticModel, n_samples: int = 100_000, batch_size: int = 4096, seed: int = 0
) -> torch.Tensor:
    """Per-feature fraction of samples in which the feature is active (after the hierarchy)."""
    _check_samples(n_samples, batch_size)
    counts_F = torch.zeros(model.num_features, dtype=torch.float64, device=model.device)
    total = 0
    with model.forked_stream(seed):
        while total < n_samples:
            bs = min(batch_size, n_samples - total)
            acts = model.sample_features_sparse(bs)
            counts_F += torch.bincount(acts.feature_idx, minlength=model.num_features).to(torch.float64)
            total += bs
    return counts_F / total


@torch.no_grad()
def superposition_stats(vectors_FD: torch.Tensor, chunk_size: int = 1024) -> dict[str, float]:
    """mean over i of max_{j≠i} |cos(d_i, d_j)|, mean |cos| over pairs, and the overall max.

    Chunked: never more than chunk_size × F similarities in memory at once.
    """
    F = vectors_FD.shape[0]
    if F < 2:
        raise ConfigError("vectors_FD", tuple(vectors_FD.shape), "need at least 2 vectors")
    require(isinstance(chunk_size, int) and chunk_size >= 1, "chunk_size", chunk_size, "must be a positive integer")
    unit_FD = vectors_FD.float()
    unit_FD = unit_FD / unit_FD.norm(dim=1, keepdim=True).clamp(min=1e-8)
    max_sum = 0.0
    abs_sum = 0.0
    overall = 0.0
    for start in range(0, F, chunk_size):
        stop = min(F, start + chunk_size)
        cos_CF = (unit_FD[start:stop] @ unit_FD.T).abs_()
        rows = torch.arange(stop - start, device=cos_CF.device)
        cos_CF[rows, rows + start] = 0.0  # exclude self-similarity
        row_max = cos_CF.max(dim=1).values
        max_sum += float(row_max.to(torch.float64).sum())
        abs_sum += float(cos_CF.to(torch.float64).sum())
        overall = max(overall, float(row_max.max()))
    return {
        "mean_max_abs_cos": max_sum / F,
        "mean_abs_cos": abs_sum / (F * (F - 1)),
        "max_abs_cos": overall,
    }


def mean_max_abs_cos(vectors_FD: torch.Tensor, chunk_size: int = 1024) -> float:
    """Mean over features of the largest |cosine| with any other feature."""
    return superposition_stats(vectors_FD, chunk_size)["mean_max_abs_cos"]


def firing_rate_range(model: SyntheticModel) -> tuple[float, float]:
    """(min, max) configured firing probability after hierarchy compensation."""
    p = model.firing_probabilities_F
    return float(p.min()), float(p.max())


def hierarchy_summary(model: SyntheticModel) -> dict[str, Any] | None:
    """Roots, depth, features in the forest, parent count and mutually-exclusive groups (None without a hierarchy)."""
    return model.hierarchy.summary() if model.hierarchy is not None else None


def describe_model(
    model: SyntheticModel, width: int | None = None, n_samples: int = 100_000, seed: int = 0, batch_size: int = 4096
) -> dict[str, Any]:
    """Everything `saelab synth describe` reports, as one JSON-ready dict."""
    if width is None:
        width = min(model.num_features, 4096)
    l0 = l0_stats(model, n_samples, (width,), batch_size, seed)
    sup = superposition_stats(model.feature_vectors_FD)
    pmin, pmax = firing_rate_range(model)
    return {
        "num_features": model.num_features,
        "hidden_dim": model.hidden_dim,
        "seed": model.seed,
        "n_samples": l0["n_samples"],
        "true_l0": l0["true_l0"],
        "true_l0_stderr": l0["true_l0_stderr"],
        "width": width,
        "l0_first_width": l0["l0_first"][width],
        "firing_probability_min": pmin,
        "firing_probability_max": pmax,
        "empirical_firing_rate_min": l0["empirical_firing_rate_min"],
        "empirical_firing_rate_max": l0["empirical_firing_rate_max"],
        "mean_max_abs_cos": sup["mean_max_abs_cos"],
        "mean_abs_cos": sup["mean_abs_cos"],
        "max_abs_cos": sup["max_abs_cos"],
        "features_per_dim": model.num_features / model.hidden_dim,
        "bias_norm": float(model.bias_D.norm()),
        "hierarchy": hierarchy_summary(model),
        "build_seconds": model.build_seconds,
    }
