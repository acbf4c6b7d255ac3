"""Per-latent detector counts and F1/precision/recall/accuracy, true firing, per-feature recall."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics import ClassificationCalculator, TrueFiringCalculator, per_true_feature_recall

# Best matches from the hand case in test_matching.py: latent 0 → f1, latent 1 → f2, latent 2 → f1.
BEST_MATCH = torch.tensor([1, 2, 1])
# 6 samples × 4 true features. f1 fires on samples {0, 1, 2} (sample 5 has a negative value: not firing);
# f2 fires on {1, 3}.
FEATURE_ACTS = torch.tensor(
    [
        [0.0, 1.0, 0.0, 2.0],
        [1.0, 2.0, 1.5, 0.0],
        [0.0, 0.5, 0.0, 0.0],
        [3.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, -0.5, 0.0, 0.0],
    ]
)
# 6 samples × 3 latents. latent 0 fires on {0, 1, 4} (a negative code still fires: ≠ 0);
# latent 1 never fires (dead); latent 2 fires on {0, 1, 2, 5}.
LATENT_ACTS = torch.tensor(
    [
        [1.0, 0.0, 0.2],
        [2.0, 0.0, 0.3],
        [0.0, 0.0, 0.1],
        [0.0, 0.0, 0.0],
        [-1.5, 0.0, 0.0],
        [0.0, 0.0, 0.4],
    ]
)
# By hand:
#   latent 0 vs f1: TP {0,1}=2, FP {4}=1, FN {2}=1, TN {3,5}=2 → P 2/3, R 2/3, F1 2/3, Acc 4/6
#   latent 1 vs f2: TP 0, FP 0, FN {1,3}=2, TN 4            → P 0 (undefined), R 0, F1 0, Acc 4/6
#   latent 2 vs f1: TP {0,1,2}=3, FP {5}=1, FN 0, TN {3,4}=2 → P 3/4, R 1, F1 6/7, Acc 5/6
EXPECTED = {
    "tp_L": [2, 0, 3],
    "fp_L": [1, 0, 1],
    "fn_L": [1, 2, 0],
    "tn_L": [2, 4, 2],
    "precision": (2 / 3 + 0 + 3 / 4) / 3,
    "recall": (2 / 3 + 0 + 1) / 3,
    "f1": (2 / 3 + 0 + 6 / 7) / 3,
    "accuracy": (4 / 6 + 4 / 6 + 5 / 6) / 3,
}


def test_hand_case_counts_and_means():
    calc = ClassificationCalculator(BEST_MATCH, num_features=4)
    calc.update(LATENT_ACTS, FEATURE_ACTS)
    out = calc.compute()
    for key in ("tp_L", "fp_L", "fn_L", "tn_L"):
        assert out[key].tolist() == EXPECTED[key], key
        assert out[key].dtype == torch.int64
    for key in ("precision", "recall", "f1", "accuracy"):
        assert out[key] == pytest.approx(EXPECTED[key], abs=1e-12), key
    # The dead latent counts as 0 in the mean, it is not dropped from it.
    assert out["f1_L"].tolist() == pytest.approx([2 / 3, 0.0, 6 / 7])
    assert out["precision_L"][1] == 0 and out["recall_L"][1] == 0
    assert out["n_samples"] == 6


def test_streaming_equals_one_batch():
    gen = torch.Generator().manual_seed(0)
    L, F, N = 9, 7, 101
    best = torch.randint(0, F, (L,), generator=gen)
    acts = torch.where(torch.rand(N, L, generator=gen) < 0.3, torch.randn(N, L, generator=gen), torch.zeros(()))
    feats = torch.where(torch.rand(N, F, generator=gen) < 0.4, torch.rand(N, F, generator=gen) + 0.1, torch.zeros(()))
    one = ClassificationCalculator(best)
    one.update(acts, feats)
    many = ClassificationCalculator(best)
    for s, e in [(0, 1), (1, 30), (30, 31), (31, 101)]:
        many.update(acts[s:e], feats[s:e])
    a, b = one.compute(), many.compute()
    for key in ("tp_L", "fp_L", "fn_L", "tn_L"):
        assert torch.equal(a[key], b[key])
    assert a["f1"] == b["f1"] and a["accuracy"] == b["accuracy"]
    # And the counts agree with a per-latent loop written the slow, obvious way.
    for j in range(L):
        fires, gt = acts[:, j] != 0, feats[:, best[j]] > 0
        assert a["tp_L"][j] == (fires & gt).sum() and a["tn_L"][j] == (~fires & ~gt).sum()


def test_sparse_inputs_are_accepted():
    calc = ClassificationCalculator(BEST_MATCH)
    calc.update(LATENT_ACTS.to_sparse(), FEATURE_ACTS.to_sparse())
    assert calc.compute()["tp_L"].tolist() == EXPECTED["tp_L"]


def test_true_firing_and_per_feature_recall():
    tf = TrueFiringCalculator(4)
    tf.update(FEATURE_ACTS[:2])
    tf.update(FEATURE_ACTS[2:])
    out = tf.compute()
    assert out["firing_count_F"].tolist() == [2, 3, 2, 2]
    assert out["true_l0"] == pytest.approx(9 / 6)
    assert out["firing_frequency_F"].tolist() == pytest.approx([2 / 6, 3 / 6, 2 / 6, 2 / 6])

    recall_L = torch.tensor([2 / 3, 0.0, 1.0])
    per_f = per_true_feature_recall(BEST_MATCH, recall_L, 4, out["firing_frequency_F"])
    # f1 is matched by latents 0 (R 2/3) and 2 (R 1) → best 1; f2 by the dead latent → 0; f0, f3 by none → 0.
    assert per_f["best_recall_F"].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert per_f["n_latents_F"].tolist() == [0, 2, 1, 0]
    assert per_f["firing_frequency_F"].tolist() == pytest.approx([2 / 6, 3 / 6, 2 / 6, 2 / 6])


def test_bad_shapes_name_the_field():
    calc = ClassificationCalculator(BEST_MATCH, num_features=4)
    with pytest.raises(ConfigError) as e:
        calc.update(LATENT_ACTS[:, :2], FEATURE_ACTS)
    assert e.value.field == "acts_BL"
    with pytest.raises(ConfigError) as e:
        calc.update(LATENT_ACTS, FEATURE_ACTS[:, :3])
    assert e.value.field == "feature_acts_BF"
    with pytest.raises(ConfigError) as e:
        calc.update(LATENT_ACTS, FEATURE_ACTS[:5])
    assert e.value.field == "feature_acts_BF"
    with pytest.raises(ConfigError) as e:
        ClassificationCalculator(torch.tensor([0, 4]), num_features=4)
    assert e.value.field == "best_match_L"
    with pytest.raises(ConfigError) as e:
        per_true_feature_recall(BEST_MATCH, torch.zeros(2), 4)
    assert e.value.field == "recall_L"
