"""The parent/child toy: closed-form losses, their direct evaluation, and trained tied/untied SAEs."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.diagnostics.absorption_theory import (
    absorption_losses,
    evaluate_toy_solution,
    toy_solutions,
    train_parent_child_toy,
)
from saelab.errors import ConfigError


@pytest.mark.parametrize("penalty", ["l1", "l0"])
@pytest.mark.parametrize("p, q, lam", [(0.25, 0.25, 0.1), (0.05, 0.3, 1.0), (0.4, 0.0, 0.5)])
def test_closed_form_matches_evaluation(penalty, p, q, lam):
    t = absorption_losses(p, q, lam, penalty)
    assert t.evaluated_faithful["mse"] == pytest.approx(0, abs=1e-12)
    assert t.evaluated_absorbing["mse"] == pytest.approx(0, abs=1e-12)
    assert t.loss_faithful == pytest.approx(t.evaluated_faithful["loss"], abs=1e-12)
    assert t.loss_absorbing == pytest.approx(t.evaluated_absorbing["loss"], abs=1e-12)
    assert t.loss_faithful == pytest.approx(lam * (q + 2 * p))
    factor = math.sqrt(2) if penalty == "l1" else 1.0
    assert t.loss_absorbing == pytest.approx(lam * (q + factor * p))
    assert t.preferred == "absorbing" and t.advantage > 0


def test_no_sparsity_or_no_child_means_no_preference():
    assert absorption_losses(0.25, 0.25, 0.0).preferred == "tie"
    assert absorption_losses(0.0, 0.5, 0.3).preferred == "tie"


def test_absorbing_solution_codes():
    sol = toy_solutions()["absorbing"]
    a = torch.relu(torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64) @ sol["W_enc"])
    assert a[0, 0] == 0 and a[0, 1] > 0  # parent latent silent when the child fires: absorbed
    assert a[1, 0] == 1 and a[1, 1] == 0


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"p_both": 1.2}, "p_both"),
        ({"p_parent_only": -0.1}, "p_parent_only"),
        ({"p_both": 0.6, "p_parent_only": 0.6}, "p_both"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"penalty": "l2"}, "penalty"),
    ],
)
def test_bad_inputs(kw, field):
    args = {"p_both": 0.25, "p_parent_only": 0.25, "lam": 0.1} | kw
    with pytest.raises(ConfigError, match=field):
        absorption_losses(**args)


def test_evaluate_rejects_unknown_penalty():
    sol = toy_solutions()["faithful"]
    with pytest.raises(ConfigError, match="penalty"):
        evaluate_toy_solution(sol["W_enc"], sol["W_dec"], 0.2, 0.2, 0.1, "l3")


def test_trained_untied_absorbs_tied_does_not():
    torch.set_num_threads(1)
    untied = train_parent_child_toy(tied=False, lam=0.03, steps=1500, seed=0)
    tied = train_parent_child_toy(tied=True, lam=0.03, steps=1500, seed=0)
    assert untied.absorbed, untied.to_dict()
    assert untied.absorption_rate == 1.0
    assert untied.parent_encoder_child_weight < -0.5  # the "hole" in the parent's encoder
    assert untied.child_decoder_parent_cos > 0.6  # the child's decoder carries the parent direction
    assert not tied.absorbed, tied.to_dict()
    assert tied.absorption_rate == 0.0
    assert abs(tied.child_decoder_parent_cos) < 0.2
