"""Decoder-only matching: |cos|, best match, uniqueness, MCC (Hungarian)."""

from __future__ import annotations

import itertools

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics import (
    feature_uniqueness,
    iter_abs_cos,
    match_decoder_to_features,
    mean_correlation_coefficient,
)

# 4 true features = the standard basis of R^4; 3 decoder rows with known |cos|:
#   latent 0 = (0.6, 0.8, 0, 0)     |cos| = (0.6, 0.8, 0, 0)     best f1
#   latent 1 = (0, 0, −2, 0)        |cos| = (0, 0, 1, 0)         best f2 (sign and scale ignored)
#   latent 2 = (0, 0.96, 0, 0.28)   |cos| = (0, 0.96, 0, 0.28)   best f1 again
HAND_W_DEC = torch.tensor([[0.6, 0.8, 0, 0], [0, 0, -2.0, 0], [0, 0.96, 0, 0.28]])
HAND_FEATS = torch.eye(4)


def test_hand_case_best_match_uniqueness_mcc():
    m = match_decoder_to_features(HAND_W_DEC, HAND_FEATS)
    assert m.best_match_L.tolist() == [1, 2, 1]
    assert m.best_cos_L.tolist() == pytest.approx([0.8, 1.0, 0.96], abs=1e-6)
    # f1 is claimed twice: 2 distinct features / 3 latents.
    assert m.uniqueness == pytest.approx(2 / 3)
    # One-to-one: l1→f2 (1.0); for l0, l2 the best disjoint pair is l0→f0 (0.6) + l2→f1 (0.96) = 1.56,
    # beating l0→f1 + l2→f3 (0.8 + 0.28 = 1.08). MCC = (0.6 + 1 + 0.96) / 3.
    assert m.mcc == pytest.approx(2.56 / 3, abs=1e-6)
    assert m.hungarian_feature_L.tolist() == [0, 2, 1]
    assert m.hungarian_cos_L.tolist() == pytest.approx([0.6, 1.0, 0.96], abs=1e-6)
    assert mean_correlation_coefficient(HAND_W_DEC, HAND_FEATS) == pytest.approx(m.mcc)
    assert feature_uniqueness(HAND_W_DEC, HAND_FEATS) == pytest.approx(2 / 3)


def _brute_force_mcc(C):
    """Max over all injective matchings of the mean matched value (min(L, F) pairs)."""
    L, F = C.shape
    if L <= F:
        return max(sum(C[j, cols[j]] for j in range(L)) for cols in itertools.permutations(range(F), L)) / L
    return max(sum(C[rows[i], i] for i in range(F)) for rows in itertools.permutations(range(L), F)) / F


@pytest.mark.parametrize("L,F", [(4, 6), (6, 4), (5, 5)])
def test_hungarian_equals_brute_force(L, F):
    gen = torch.Generator().manual_seed(L * 10 + F)
    W, feats = torch.randn(L, 3, generator=gen), torch.randn(F, 3, generator=gen)
    C = torch.nn.functional.cosine_similarity(W[:, None, :], feats[None, :, :], dim=-1).abs().double()
    m = match_decoder_to_features(W, feats)
    assert m.mcc == pytest.approx(_brute_force_mcc(C).item(), abs=1e-6)
    assert int((m.hungarian_feature_L >= 0).sum()) == min(L, F)
    matched = m.hungarian_feature_L[m.hungarian_feature_L >= 0]
    assert matched.unique().numel() == min(L, F)  # one-to-one


def test_chunking_does_not_change_anything():
    gen = torch.Generator().manual_seed(1)
    W, feats = torch.randn(37, 16, generator=gen), torch.randn(50, 16, generator=gen)
    whole = match_decoder_to_features(W, feats, chunk_size=1000)
    for chunk in (1, 7, 36):
        part = match_decoder_to_features(W, feats, chunk_size=chunk)
        assert torch.equal(part.best_match_L, whole.best_match_L)
        assert part.mcc == pytest.approx(whole.mcc, abs=1e-7)
        assert part.uniqueness == whole.uniqueness
    rows = torch.cat([c for _, c in iter_abs_cos(W, feats, chunk_size=5)])
    ref = (W / W.norm(dim=1, keepdim=True)) @ (feats / feats.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(rows, ref.abs(), atol=1e-6, rtol=0)


def test_permuted_sign_flipped_rescaled_decoder_has_mcc_one():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(12, 16, generator=gen)
    perm = torch.randperm(12, generator=gen)
    signs = torch.where(torch.rand(12, generator=gen) < 0.5, -1.0, 1.0)
    scales = 0.1 + torch.rand(12, generator=gen)
    W = feats[perm] * (signs * scales)[:, None]
    m = match_decoder_to_features(W, feats)
    assert m.mcc == pytest.approx(1.0, abs=1e-6)
    assert m.uniqueness == 1.0
    assert torch.equal(m.best_match_L, perm)
    assert torch.equal(m.hungarian_feature_L, perm)


def test_more_latents_than_features_leaves_some_unmatched():
    feats = torch.eye(2, 3)
    W = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0]])
    m = match_decoder_to_features(W, feats)
    assert m.mcc == pytest.approx(1.0, abs=1e-6)  # 2 pairs: l0→f0, l2→f1
    assert m.hungarian_feature_L.tolist() == [0, -1, 1]
    assert m.uniqueness == pytest.approx(2 / 3)


def test_zero_decoder_row_matches_feature_zero_with_cos_zero():
    # As SAELens: norms clamped at 1e-8, so a zero row has |cos| 0 everywhere and argmax → 0.
    m = match_decoder_to_features(torch.zeros(1, 4), torch.eye(4)[[2, 3]])
    assert m.best_match_L.tolist() == [0] and m.best_cos_L.tolist() == [0.0] and m.mcc == 0.0


def test_bad_inputs_name_the_field():
    with pytest.raises(ConfigError) as e:
        match_decoder_to_features(torch.randn(3, 5), torch.randn(4, 6))
    assert e.value.field == "d_in"
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ConfigError) as e:
        match_decoder_to_features(bad, torch.randn(4, 4))
    assert e.value.field == "W_dec_LD"
    with pytest.raises(ConfigError) as e:
        match_decoder_to_features(torch.randn(3, 4), torch.randn(4, 4), chunk_size=0)
    assert e.value.field == "chunk_size"
    with pytest.raises(ConfigError) as e:
        match_decoder_to_features(torch.randn(3, 4), torch.randn(0, 4))
    assert e.value.field == "feature_vectors_FD"
