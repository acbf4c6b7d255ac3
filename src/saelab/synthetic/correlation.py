"""Correlation structures for the Gaussian copula that decides which features fire together."""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from saelab.errors import ConfigError

# SAELens caps rows of the low-rank factor so the independent variance never drops below this.
_MIN_DIAG = 0.01


class LowRankCorrelation(NamedTuple):
    """Σ = factor_FR factor_FRᵀ + diag(diag_F), with unit diagonal."""

    factor_FR: torch.Tensor
    diag_F: torch.Tensor


def generate_low_rank_correlation(
    num_features: int, rank: int, correlation_scale: float, seed: int | None
) -> LowRankCorrelation:
    """Random low-rank correlation, identical to SAELens's `generate_random_low_rank_correlation_matrix` on CPU."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    factor_FR = torch.randn(num_features, rank, generator=gen, dtype=torch.float32) * correlation_scale
    sq_F = (factor_FR**2).sum(dim=1)
    capped_F = (1 - sq_F) < _MIN_DIAG
    if capped_F.any():
        # Shrink over-long rows so each feature keeps at least 1% independent variance.
        factor_FR[capped_F, :] *= torch.sqrt((1 - _MIN_DIAG) / sq_F[capped_F].unsqueeze(1))
        sq_F = (factor_FR**2).sum(dim=1)
    return LowRankCorrelation(factor_FR, 1 - sq_F)


def validate_low_rank(factor_FR: torch.Tensor, diag_F: torch.Tensor, num_features: int, where: str) -> None:
    if factor_FR.ndim != 2 or factor_FR.shape[0] != num_features:
        raise ConfigError(
            f"{where}correlation_factor", tuple(factor_FR.shape), f"must have shape ({num_features}, rank)"
        )
    if diag_F.shape != (num_features,):
        raise ConfigError(f"{where}correlation_diag", tuple(diag_F.shape), f"must have shape ({num_features},)")
    if not torch.isfinite(factor_FR).all() or not torch.isfinite(diag_F).all():
        raise ConfigError(f"{where}correlation_factor", "non-finite", "must be finite")
    if (diag_F <= 0).any():
        raise ConfigError(f"{where}correlation_diag", float(diag_F.min()), "must be > 0 everywhere")


def fix_correlation_matrix(matrix_FF: torch.Tensor, min_eigenvalue: float = 1e-6) -> torch.Tensor:
    """Nearest-ish PSD correlation matrix: clip eigenvalues at `min_eigenvalue`, rescale to unit diagonal."""
    evals, evecs = torch.linalg.eigh(matrix_FF)
    fixed = evecs @ torch.diag(evals.clamp(min=min_eigenvalue)) @ evecs.T
    d = torch.sqrt(torch.diag(fixed).clamp(min=1e-12))
    fixed = fixed / (d.unsqueeze(0) * d.unsqueeze(1))
    fixed = (fixed + fixed.T) / 2  # V diag(λ) Vᵀ is symmetric only up to rounding
    fixed.fill_diagonal_(1.0)
    return fixed


def generate_random_correlation_matrix(
    num_features: int,
    positive_ratio: float = 0.5,
    uncorrelated_ratio: float = 0.3,
    min_strength: float = 0.3,
    max_strength: float = 0.9,
    seed: int | None = None,
) -> torch.Tensor:
    """The Sparse-but-Wrong toy's random correlation matrix (float32, F×F).

    Follows `sparse_but_wrong.toy_models.get_training_batch.generate_random_correlation_matrix`
    draw for draw (Python `random` seeded with `seed`): pick `1 - uncorrelated_ratio` of the pairs,
    the first `positive_ratio` of the picked pairs are positive, strengths ~ U[min, max]; then
    always clip eigenvalues at 1e-6 and renormalise to unit diagonal. So seed 42 gives the paper's matrix.
    """
    rng = random.Random(seed)
    matrix = torch.eye(num_features, dtype=torch.float32)
    pairs = [(i, j) for i in range(num_features) for j in range(i + 1, num_features)]
    if not pairs:
        return matrix
    num_correlated = len(pairs) - int(len(pairs) * uncorrelated_ratio)
    if num_correlated == 0:
        return matrix
    chosen = rng.sample(pairs, num_correlated)
    num_positive = int(num_correlated * positive_ratio)
    for k, (i, j) in enumerate(chosen):
        rho = (1 if k < num_positive else -1) * rng.uniform(min_strength, max_strength)
        matrix[i, j] = rho
        matrix[j, i] = rho
    return fix_correlation_matrix(matrix)


def validate_correlation_matrix(
    matrix_FF: torch.Tensor, field_name: str = "correlation.matrix", atol: float = 1e-5
) -> None:
    """Raise ConfigError unless the matrix is square, finite, symmetric, unit-diagonal and PSD."""
    if matrix_FF.ndim != 2 or matrix_FF.shape[0] != matrix_FF.shape[1]:
        raise ConfigError(field_name, tuple(matrix_FF.shape), "must be a square matrix")
    m = matrix_FF.to(torch.float64)
    if not torch.isfinite(m).all():
        raise ConfigError(field_name, "non-finite entries", "must be finite")
    asym = (m - m.T).abs().max().item()
    if asym > atol:
        raise ConfigError(field_name, f"max |C - Cᵀ| = {asym:.3g}", "must be symmetric")
    diag_err = (torch.diag(m) - 1).abs().max().item()
    if diag_err > atol:
        raise ConfigError(field_name, f"max |diag - 1| = {diag_err:.3g}", "must have a unit diagonal")
    min_eig = torch.linalg.eigvalsh((m + m.T) / 2).min().item()
    if min_eig < -1e-6:
        raise ConfigError(field_name, f"min eigenvalue {min_eig:.3g}", "must be positive semi-definite")


def correlation_sampling_factor(matrix_FF: torch.Tensor) -> torch.Tensor:
    """A float32 L with L Lᵀ = C (Cholesky, or an eigen square root when C is only semi-definite)."""
    m = matrix_FF.to(torch.float64)
    m = (m + m.T) / 2
    L, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(m)
        L = evecs * evals.clamp(min=0).sqrt().unsqueeze(0)
    return L.to(torch.float32)
