"""Absorption, hedging and recall on a hand-built parent/child model with hand-set SAEs."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from saelab.diagnostics.absorption import hedging_stats, hierarchy_diagnostics, parent_children
from saelab.errors import ConfigError
from tests.diagnostics.diag_standins import HandSAE, TreeModel

# Sampled statistics are checked with two-sided bounds that a correct implementation exceeds by
# chance with probability at most 5e-5 each (1e-4 per test), from the sample count and the variance.
Z = norm.isf(5e-5 / 2)  # 4.06
N = 4000


@pytest.fixture(scope="module")
def model():
    return TreeModel()


def faithful(model):
    f = model.feature_vectors_FD
    return HandSAE(f.T, f)


# Each child latent's decoder mixes in the parent: cos PARENT_MIX with f_parent, CHILD_COS with its own child.
# CHILD_COS > PARENT_MIX by a clear margin, so matching a latent to its child is never a float-rounding tie
# (with equal parts the argmax could pick the parent, and did on AVX-512 CPUs).
PARENT_MIX, CHILD_COS = 0.6, 0.8


def absorbing(model):
    f = model.feature_vectors_FD
    W_enc = torch.stack([f[0] - f[1] - f[2], f[1], f[2], f[3]]).T
    W_dec = torch.stack([f[0], PARENT_MIX * f[0] + CHILD_COS * f[1], PARENT_MIX * f[0] + CHILD_COS * f[2], f[3]])
    return HandSAE(W_enc, W_dec)


def test_absorbing_latents_match_their_child_by_a_clear_margin(model):
    h = hedging_stats(absorbing(model), model.feature_vectors_FD, torch.tensor([0]))
    assert h["best_match"].tolist() == [0, 1, 2, 3]
    assert h["best_cos"][1:3].tolist() == pytest.approx([CHILD_COS] * 2, abs=1e-5)


def test_parent_children(model):
    parents, children = parent_children(model)
    assert parents.tolist() == [0]
    assert sorted(children[0].tolist()) == [1, 2]


def test_faithful_sae_has_no_absorption(model):
    d = hierarchy_diagnostics(faithful(model), model, n_samples=N, batch_size=1000)
    s = d.summary
    assert s["absorption_rate"] == 0.0
    assert s["parent_miss_rate_with_child"] == 0.0
    assert s["recall_weighted"] == pytest.approx(1.0)
    assert s["mean_excess_cos_top"] == pytest.approx(0.0, abs=1e-5)
    assert s["mean_mixing"] == pytest.approx(0.0, abs=1e-5)
    # L0 = parent + child + free; per-sample variance 0.25 + 0.2275 + 0.16 + 2·cov(parent, child) 0.175
    assert s["l0"] == pytest.approx(0.5 + 0.5 * 0.7 + 0.2, abs=Z * math.sqrt(0.9875 / N))


def test_absorbing_sae_is_detected(model):
    d = hierarchy_diagnostics(absorbing(model), model, n_samples=N, batch_size=1000)
    s = d.summary
    assert s["absorption_rate"] == pytest.approx(1.0)
    assert s["parent_miss_rate_with_child"] == pytest.approx(1.0)
    assert s["parent_miss_rate_parent_only"] == 0.0
    assert s["absorbing_child_latents"] == 2
    # the parent's own latent only fires when no child does: recall = P(no child | parent) = 0.3, a
    # proportion over the ~N/2 samples with the parent (at least N/2 − 5·√(N/4) but for p < 3e-7)
    n_parent = N / 2 - 5 * math.sqrt(N / 4)
    assert d.feature_stats["recall"][0] == pytest.approx(0.3, abs=Z * math.sqrt(0.3 * 0.7 / n_parent))
    assert d.feature_stats["recall"][1] == pytest.approx(1.0)
    # hedging: the child latents mix in the most frequent feature (the parent) with excess cos PARENT_MIX;
    # the free feature's latent mixes in nothing (the parent's own latent is excluded)
    assert d.top_features[0] == 0
    assert s["mean_excess_cos_top1"] == pytest.approx((2 * PARENT_MIX + 0) / 3, abs=1e-5)


def test_parent_cos_threshold_controls_absorbing_latents(model):
    d = hierarchy_diagnostics(absorbing(model), model, n_samples=2000, parent_cos=0.9)
    assert d.summary["absorption_rate"] == 0.0  # parent component 0.6 < 0.9: a miss, not absorption
    assert d.summary["parent_miss_rate_with_child"] == pytest.approx(1.0)


def test_hedging_sign_convention(model):
    f = model.feature_vectors_FD
    W = torch.stack([-(f[1] + 0.3 * f[0]), f[0]])  # latent 0 matched to −f1, mixing in +f0
    h = hedging_stats(W, f, torch.tensor([0]))
    assert h["best_match"].tolist() == [1, 0]
    assert h["excess_top"][0, 0] == pytest.approx(0.3 / math.sqrt(1.09), abs=1e-5)
    assert torch.isnan(h["excess_top"][1, 0])  # latent 1 is feature 0's own latent


def test_errors(model):
    wrong = HandSAE(torch.eye(5)[:, :4], torch.eye(5)[:4])
    with pytest.raises(ConfigError, match="same width"):
        hierarchy_diagnostics(wrong, model, n_samples=10)
    flat = TreeModel()
    flat.hierarchy = None
    with pytest.raises(ConfigError, match="hierarchy"):
        hierarchy_diagnostics(faithful(flat), flat, n_samples=10)
    with pytest.raises(ConfigError, match="n_samples"):
        hierarchy_diagnostics(faithful(model), model, n_samples=0)
