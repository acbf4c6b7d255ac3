"""Signed codes in the ground-truth metrics (AbsTopK): a latent fires when its code is ≠ 0, and a code h
writes h·W_dec[l], so it detects its matched feature only when sign(h)·cos(W_dec[l], f) > 0. The same rule
for SAEs (`evaluate_sae_on_synthetic`) and transcoders (`evaluate_transcoder`)."""

from __future__ import annotations

import pytest
import torch

from saelab.metrics import evaluate_sae_on_synthetic
from saelab.metrics.classification import ClassificationCalculator
from saelab.metrics.ground_truth import match_signs
from saelab.metrics.transcoder import evaluate_transcoder
from saelab.synthetic import TranscoderWorld
from tests.metrics.test_transcoder_metrics import ExactTranscoder, Recorder, world_config

N = 6000


def test_signed_counts_by_hand():
    """Latent 0 points along its feature (s = +1), latent 1 against it (s = −1); both match feature 0."""
    calc = ClassificationCalculator(torch.tensor([0, 0]), num_features=1, sign_L=torch.tensor([1.0, -1.0]))
    acts_BL = torch.tensor(
        [
            [2.0, -2.0],  # feature on: both write +f          → TP for both
            [-1.0, 1.0],  # feature on: both write −f          → FP and FN for both
            [0.0, 0.0],  # feature on: silent                 → FN
            [3.0, 0.0],  # feature off: latent 0 writes +f    → FP for latent 0, TN for latent 1
            [-3.0, 0.0],  # feature off: latent 0 writes −f   → FP for latent 0, TN for latent 1
            [0.0, 0.0],  # feature off, silent                → TN
        ]
    )
    gt_BF = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    calc.update(acts_BL, gt_BF)
    c = calc.compute()
    assert c["tp_L"].tolist() == [1, 1]
    assert c["fp_L"].tolist() == [3, 1]
    assert c["fn_L"].tolist() == [2, 2]
    assert c["tn_L"].tolist() == [1, 3]
    assert c["precision_L"].tolist() == [0.25, 0.5]
    assert c["recall_L"].tolist() == pytest.approx([1 / 3, 1 / 3])
    # Samples where firing-toward-f agrees with the feature: the TP and the TNs (a wrong-way firing never does).
    assert c["accuracy_L"].tolist() == pytest.approx([2 / 6, 4 / 6])
    # Unsigned (SynthSAEBench): every firing counts for the feature.
    plain = ClassificationCalculator(torch.tensor([0, 0]), num_features=1)
    plain.update(acts_BL, gt_BF)
    p = plain.compute()
    assert p["tp_L"].tolist() == [2, 2] and p["tn_L"].tolist() == [1, 3]
    assert p["accuracy_L"].tolist() == pytest.approx([3 / 6, 5 / 6])


class AbsOracleSAE:
    """A stand-in ReLU-style SAE: decoder rows given, codes |projection| (never negative)."""

    def __init__(self, oracle):
        self.oracle, self.W_dec_LD, self.cfg = oracle, oracle.W_dec_LD, oracle.cfg

    def encode(self, x_BD):
        return self.oracle.encode(x_BD).abs()

    def decode(self, acts_BL):
        return self.oracle.decode(acts_BL)


def test_sae_codes_count_only_toward_their_feature(fakes):
    model = fakes.ToyModel(num_features=6, hidden_dim=8, seed=3)
    signs = torch.tensor([-1.0, 1, -1, 1, 1, 1])
    # AbsTopK-style: row −f with code −a writes +a f, exactly the feature: a perfect detector.
    signed = fakes.make_oracle(model, signs=signs)
    assert evaluate_sae_on_synthetic(signed, model, n_samples=N, seed=0).f1 == 1.0
    # The same rows with codes +a write −a f: the two flipped latents never detect their feature
    # (SynthSAEBench's |cos| matching would score them 1 and this SAE F1 = 1).
    res = evaluate_sae_on_synthetic(AbsOracleSAE(signed), model, n_samples=N, seed=0)
    assert res.f1 == pytest.approx(4 / 6) and res.precision == pytest.approx(4 / 6)
    assert res.diagnostics["f1_L"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert res.mcc == pytest.approx(1.0, abs=1e-6)  # decoder-only: |cos|, as SynthSAEBench
    assert res.l0 == pytest.approx(res.true_l0) and res.dead_latents == 0  # they do fire (≠ 0)


def test_match_signs():
    W_LD = torch.tensor([[1.0, 0.1], [-2.0, 0.0], [0.0, 0.0]])
    feats_FD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert match_signs(W_LD, feats_FD, torch.tensor([0, 0, 1])).tolist() == [1.0, -1.0, 1.0]


@pytest.fixture(scope="module")
def world():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TranscoderWorld(world_config())
    torch.set_num_threads(old)


def test_transcoder_signed_codes(world):
    rec = Recorder(world)
    kinds = world.output_kinds()
    # Flip every computing output's row and a plain one: their latents write their features with codes −c.
    flip = torch.cat([kinds["and"], kinds["suppression"], kinds["fanout"], torch.tensor([0])]).unique()
    W = world.u_out_FE.clone()
    W[flip] = -W[flip]

    def negate(codes_BF):
        codes_BF[:, flip] = -codes_BF[:, flip]
        return codes_BF

    abs_like = evaluate_transcoder(ExactTranscoder(rec, negate, W_dec_LE=W), rec, N, seed=0)
    # ŷ is unchanged, and every latent still writes exactly its feature: a perfect score (before, codes < 0
    # did not fire, so the flipped latents scored 0 and no computing feature was recovered).
    assert abs_like.f1 == 1.0 and abs_like.precision == abs_like.recall == abs_like.accuracy == 1.0
    assert abs_like.computing_features_recovered == 1.0
    assert abs_like.l0 == abs_like.true_l0 and abs_like.dead_latents == 0

    # Rows flipped, codes left positive: those latents write −u, so they detect nothing and recover nothing.
    wrong = evaluate_transcoder(ExactTranscoder(rec, W_dec_LE=W), rec, N, seed=0)
    assert wrong.computing_features_recovered == 0.0
    f1_L = wrong.diagnostics["f1_L"]
    assert f1_L[flip].eq(0).all() and f1_L[~torch.isin(torch.arange(f1_L.numel()), flip)].eq(1).all()
    assert wrong.mcc == pytest.approx(1.0, abs=1e-6)  # decoder-only |cos|
