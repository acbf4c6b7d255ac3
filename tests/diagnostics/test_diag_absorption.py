"""Absorption, hedging and recall on a hand-built parent/child model with hand-set SAEs."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.diagnostics.absorption import hedging_stats, hierarchy_diagnostics, parent_children
from saelab.errors import ConfigError

from diag_standins import HandSAE, TreeModel


@pytest.fixture(scope="module")
def model():
    return TreeModel()


def faithful(model):
    f = model.feature_vectors_FD
    return HandSAE(f.T, f)


def absorbing(model):
    f = model.feature_vectors_FD
    W_enc = torch.stack([f[0] - f[1] - f[2], f[1], f[2], f[3]]).T
    r = 2 ** -0.5
    W_dec = torch.stack([f[0], r * (f[0] + f[1]), r * (f[0] + f[2]), f[3]])
    return HandSAE(W_enc, W_dec)


def test_parent_children(model):
    parents, children = parent_children(model)
    assert parents.tolist() == [0]
    assert sorted(children[0].tolist()) == [1, 2]


def test_faithful_sae_has_no_absorption(model):
    d = hierarchy_diagnostics(faithful(model), model, n_samples=4000, batch_size=1000)
    s = d.summary
    assert s["absorption_rate"] == 0.0
    assert s["parent_miss_rate_with_child"] == 0.0
    assert s["recall_weighted"] == pytest.approx(1.0)
    assert s["mean_excess_cos_top"] == pytest.approx(0.0, abs=1e-5)
    assert s["mean_mixing"] == pytest.approx(0.0, abs=1e-5)
    assert s["l0"] == pytest.approx(0.5 + 0.5 * 0.7 + 0.2, abs=0.05)


def test_absorbing_sae_is_detected(model):
    d = hierarchy_diagnostics(absorbing(model), model, n_samples=4000, batch_size=1000)
    s = d.summary
    assert s["absorption_rate"] == pytest.approx(1.0)
    assert s["parent_miss_rate_with_child"] == pytest.approx(1.0)
    assert s["parent_miss_rate_parent_only"] == 0.0
    assert s["absorbing_child_latents"] == 2
    # the parent's own latent only fires when no child does: recall = P(no child | parent) = 0.3
    assert d.feature_stats["recall"][0] == pytest.approx(0.3, abs=0.04)
    assert d.feature_stats["recall"][1] == pytest.approx(1.0)
    # hedging: the child latents mix in the most frequent feature (the parent) with excess cos 1/√2
    assert d.top_features[0] == 0
    assert s["mean_excess_cos_top1"] == pytest.approx((2 * 2 ** -0.5 + 0) / 3, abs=1e-5)


def test_parent_cos_threshold_controls_absorbing_latents(model):
    d = hierarchy_diagnostics(absorbing(model), model, n_samples=2000, parent_cos=0.9)
    assert d.summary["absorption_rate"] == 0.0  # parent component 0.707 < 0.9: a miss, not absorption
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
