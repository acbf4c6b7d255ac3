"""Decoder-only ground-truth matching: |cos| between SAE decoder rows and true feature vectors.

Every metric here depends on the weights only, never on activations:

    C[j, i] = |cos(W_dec[j], feature_vectors[i])|                       shape [L, F]
    best_match_L[j] = argmax_i C[j, i],  best_cos_L[j] = max_i C[j, i]
    uniqueness = #unique(best_match_L) / L
    MCC = (1 / min(L, F)) · Σ_{(j, i) ∈ M} C[j, i],  M = argmax over one-to-one matchings of Σ C
          (Hungarian: scipy.optimize.linear_sum_assignment on the cost 1 − C)

Exactly SynthSAEBench's definitions (`sae_lens/synthetic/evals.py`). C is built in row chunks so
that a 4096 × 16384 problem never holds more than one float32 chunk plus (for MCC) the float64
cost matrix that the assignment solver needs anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from saelab.errors import ConfigError, require

# Norms are clamped here before dividing, as SAELens does: a zero row gets cos 0 with everything.
_NORM_EPS = 1e-8
# Elements per |cos| chunk (64 MiB in float32); rows per chunk = this // F.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class DecoderMatch:
    """Result of matching SAE decoder rows to true features (all tensors on the CPU).

    `hungarian_feature_L[j]` is latent j's partner in the one-to-one (Hungarian) matching, −1 if
    j is unmatched (only possible when L > F); `hungarian_cos_L[j]` its |cos| (0 if unmatched).
    `mcc` and `hungarian_*` are None when the matching was not requested.
    """

    best_match_L: torch.Tensor
    best_cos_L: torch.Tensor
    uniqueness: float
    mcc: float | None = None
    hungarian_feature_L: torch.Tensor | None = None
    hungarian_cos_L: torch.Tensor | None = None

    @property
    def num_latents(self) -> int:
        return int(self.best_match_L.shape[0])


def _check_pair(W_dec_LD: torch.Tensor, feature_vectors_FD: torch.Tensor) -> None:
    require(
        isinstance(W_dec_LD, torch.Tensor) and W_dec_LD.ndim == 2 and W_dec_LD.shape[0] > 0,
        "W_dec_LD",
        tuple(getattr(W_dec_LD, "shape", ())),
        "must be a non-empty 2-D tensor [L, D]",
    )
    require(
        isinstance(feature_vectors_FD, torch.Tensor)
        and feature_vectors_FD.ndim == 2
        and feature_vectors_FD.shape[0] > 0,
        "feature_vectors_FD",
        tuple(getattr(feature_vectors_FD, "shape", ())),
        "must be a non-empty 2-D tensor [F, D]",
    )
    require(
        W_dec_LD.shape[1] == feature_vectors_FD.shape[1],
        "d_in",
        W_dec_LD.shape[1],
        f"decoder rows have dimension {W_dec_LD.shape[1]} but true features have {feature_vectors_FD.shape[1]}",
    )
    # The assignment solver rejects NaN/inf with an obscure message; say which input is at fault.
    for name, t in (("W_dec_LD", W_dec_LD), ("feature_vectors_FD", feature_vectors_FD)):
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(name, tuple(t.shape), "contains NaN or infinite values")


def _unit_rows(M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    M = M.detach().to(dtype)
    return M / M.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)


def iter_abs_cos(
    W_dec_LD: torch.Tensor,
    feature_vectors_FD: torch.Tensor,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(start, C_cF)` with C = |cos(W_dec rows, feature vectors)| for rows start..start+c.

    Computed on W_dec's device in at least float32 (float64 if either input is float64), clamped
    to ≤ 1 so rounding never reports |cos| = 1.0000001. `chunk_size` = rows per chunk (default:
    as many as fit in 2²⁴ elements).
    """
    _check_pair(W_dec_LD, feature_vectors_FD)
    L, F = W_dec_LD.shape[0], feature_vectors_FD.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // F)
    require(isinstance(chunk_size, int) and chunk_size > 0, "chunk_size", chunk_size, "must be a positive integer")
    dtype = torch.promote_types(torch.promote_types(W_dec_LD.dtype, feature_vectors_FD.dtype), torch.float32)
    device = W_dec_LD.device
    feats_FD = _unit_rows(feature_vectors_FD.to(device), dtype)
    with torch.no_grad():
        for start in range(0, L, chunk_size):
            dec_cD = _unit_rows(W_dec_LD[start : start + chunk_size], dtype)
            yield start, (dec_cD @ feats_FD.T).abs_().clamp_(max=1.0)


def match_decoder_to_features(
    W_dec_LD: torch.Tensor,
    feature_vectors_FD: torch.Tensor,
    *,
    hungarian: bool = True,
    chunk_size: int | None = None,
) -> DecoderMatch:
    """Best match, uniqueness and (if `hungarian`) MCC from one pass over C = |cos| [L, F].

    best_match_L = argmax_F C (first index on ties), best_cos_L = max_F C,
    uniqueness = #unique(best_match_L) / L,
    MCC = mean of C over the min(L, F) pairs of the Hungarian matching that maximises Σ C.
    """
    _check_pair(W_dec_LD, feature_vectors_FD)
    L, F = W_dec_LD.shape[0], feature_vectors_FD.shape[0]
    best_match_L = torch.empty(L, dtype=torch.long)
    best_cos_L = torch.empty(L, dtype=torch.float64)
    # float64 because linear_sum_assignment converts to it anyway; filling it directly avoids a copy.
    cost_LF = np.empty((L, F), dtype=np.float64) if hungarian else None
    for start, C_cF in iter_abs_cos(W_dec_LD, feature_vectors_FD, chunk_size):
        stop = start + C_cF.shape[0]
        values, indices = C_cF.max(dim=1)
        best_match_L[start:stop] = indices.cpu()
        best_cos_L[start:stop] = values.cpu().double()
        if cost_LF is not None:
            np.subtract(1.0, C_cF.cpu().numpy(), out=cost_LF[start:stop])
    uniqueness = int(best_match_L.unique().numel()) / L
    if cost_LF is None:
        return DecoderMatch(best_match_L=best_match_L, best_cos_L=best_cos_L, uniqueness=uniqueness)

    rows, cols = linear_sum_assignment(cost_LF)
    matched_cos = 1.0 - cost_LF[rows, cols]
    hungarian_feature_L = torch.full((L,), -1, dtype=torch.long)
    hungarian_feature_L[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    hungarian_cos_L = torch.zeros(L, dtype=torch.float64)
    hungarian_cos_L[torch.from_numpy(rows)] = torch.from_numpy(matched_cos)
    return DecoderMatch(
        best_match_L=best_match_L,
        best_cos_L=best_cos_L,
        uniqueness=uniqueness,
        mcc=float(matched_cos.mean()),  # len(rows) == min(L, F)
        hungarian_feature_L=hungarian_feature_L,
        hungarian_cos_L=hungarian_cos_L,
    )


def mean_correlation_coefficient(
    W_dec_LD: torch.Tensor, feature_vectors_FD: torch.Tensor, *, chunk_size: int | None = None
) -> float:
    """MCC = (1 / min(L, F)) · Σ_{(j,i) ∈ M} |cos(W_dec[j], f_i)|, M the Hungarian one-to-one matching
    minimising Σ (1 − |cos|). Decoder-only; 1 iff every matched pair is parallel or antiparallel."""
    match = match_decoder_to_features(W_dec_LD, feature_vectors_FD, hungarian=True, chunk_size=chunk_size)
    assert match.mcc is not None
    return match.mcc


def feature_uniqueness(
    W_dec_LD: torch.Tensor, feature_vectors_FD: torch.Tensor, *, chunk_size: int | None = None
) -> float:
    """uniqueness = #unique_j(argmax_i |cos(W_dec[j], f_i)|) / L (dead latents stay in the denominator)."""
    return match_decoder_to_features(W_dec_LD, feature_vectors_FD, hungarian=False, chunk_size=chunk_size).uniqueness
