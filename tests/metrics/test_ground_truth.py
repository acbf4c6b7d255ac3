"""evaluate_sae_on_synthetic end to end on tiny stand-in models."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics import GroundTruthResult, evaluate_sae_on_synthetic
from saelab.metrics.ground_truth import match_signs
from saelab.metrics.matching import match_decoder_to_features
from saelab.saes.base import SAEConfig


def test_oracle_sae_scores_perfectly(fakes):
    model = fakes.ToyModel(num_features=6, hidden_dim=8, bias=2.0)
    res = evaluate_sae_on_synthetic(fakes.make_oracle(model), model, n_samples=500, batch_size=64)
    assert res.f1 == 1.0 and res.precision == 1.0 and res.recall == 1.0 and res.accuracy == 1.0
    assert res.mcc == pytest.approx(1.0, abs=1e-6)
    assert res.uniqueness == 1.0
    assert res.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert res.shrinkage == pytest.approx(1.0, abs=1e-5)
    assert res.l0 == res.true_l0 == pytest.approx(0.3 * 6, rel=0.15)
    assert res.dead_latents == 0 and res.n_samples == 500
    assert res.mse == pytest.approx(0.0, abs=1e-9)
    per_f = res.true_feature_recall()
    assert per_f["best_recall_F"].tolist() == [1.0] * 6 and per_f["n_latents_F"].tolist() == [1] * 6
    assert per_f["firing_frequency_F"].sum() == pytest.approx(res.true_l0)


def test_permuted_sign_flipped_oracle_still_scores_one(fakes):
    model = fakes.ToyModel(num_features=6, hidden_dim=8, seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    signs = torch.tensor([-1.0, 1, -1, -1, 1, 1])
    sae = fakes.make_oracle(model, perm=perm, signs=signs)
    res = evaluate_sae_on_synthetic(sae, model, n_samples=300, batch_size=100)
    assert res.mcc == pytest.approx(1.0, abs=1e-6) and res.uniqueness == 1.0
    assert res.f1 == 1.0  # negative codes fire (≠ 0) exactly when their feature does
    assert res.diagnostics["best_match_L"].tolist() == perm.tolist()
    assert res.explained_variance == pytest.approx(1.0, abs=1e-6)


def test_oracle_with_a_dead_latent_loses_exactly_its_share(fakes):
    model = fakes.ToyModel(num_features=6, hidden_dim=8, seed=4)
    sae = fakes.make_oracle(model)
    base_encode = sae.encode
    sae.encode = lambda x: base_encode(x) * torch.tensor([1.0, 1, 1, 1, 1, 0])  # latent 5 never fires
    res = evaluate_sae_on_synthetic(sae, model, n_samples=300)
    assert res.dead_latents == 1
    assert res.f1 == pytest.approx(5 / 6) and res.precision == pytest.approx(5 / 6)
    assert res.mcc == pytest.approx(1.0, abs=1e-6)  # decoder-only: unaffected


def test_streaming_over_batches_equals_one_big_batch(fakes):
    def run(batch_size):
        model = fakes.PoolModel(200, num_features=5, hidden_dim=7, p=0.4, bias=1.0, seed=5)
        sae = fakes.ReluSAE(SAEConfig(d_in=7, d_sae=9))
        sae.reset_parameters(torch.Generator().manual_seed(6))
        with torch.no_grad():
            sae.b_enc_L.fill_(-0.02)
        return evaluate_sae_on_synthetic(sae, model, n_samples=200, batch_size=batch_size)

    one, many = run(200), run(13)
    a, b = one.to_dict(), many.to_dict()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
    for k in ("tp_L", "fp_L", "fn_L", "tn_L", "fire_count_L", "firing_count_F"):
        assert torch.equal(one.diagnostics[k], many.diagnostics[k]), k
    assert 0 < a["f1"] < 1  # a non-trivial case


def test_seed_makes_sampling_reproducible_and_restores_global_rng(fakes):
    class GlobalRngModel(fakes.ToyModel):
        def sample_with_features(self, batch_size):  # draws from the global torch RNG
            a_BF = (torch.rand(batch_size, self.num_features) < 0.3).float()
            return a_BF @ self.feature_vectors_FD, a_BF

    model = GlobalRngModel(num_features=4, hidden_dim=4)
    sae = fakes.ReluSAE(SAEConfig(d_in=4, d_sae=5))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    r1 = evaluate_sae_on_synthetic(sae, model, n_samples=50, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    r2 = evaluate_sae_on_synthetic(sae, model, n_samples=50, seed=7)
    assert r1.to_dict() == r2.to_dict()


def test_result_round_trips_through_json(fakes):
    model = fakes.ToyModel(num_features=4, hidden_dim=4)
    res = evaluate_sae_on_synthetic(fakes.make_oracle(model), model, n_samples=20)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d) == {
        "f1", "precision", "recall", "accuracy", "mcc", "uniqueness", "explained_variance",
        "shrinkage", "l0", "true_l0", "dead_latents", "mse", "n_samples",
    }  # fmt: skip
    assert GroundTruthResult.from_dict(d) == res


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": -5}, "n_samples"),
        ({"n_samples": 10, "batch_size": 0}, "batch_size"),
        ({"n_samples": 10, "device": "meta"}, "device"),
    ],
)
def test_bad_arguments_name_the_field(fakes, kwargs, field):
    model = fakes.ToyModel(num_features=4, hidden_dim=4)
    with pytest.raises(ConfigError) as e:
        evaluate_sae_on_synthetic(fakes.make_oracle(model), model, **kwargs)
    assert e.value.field == field


def test_mismatched_d_in_names_the_field(fakes):
    model = fakes.ToyModel(num_features=4, hidden_dim=6)
    sae = fakes.ReluSAE(SAEConfig(d_in=5, d_sae=4))
    with pytest.raises(ConfigError) as e:
        evaluate_sae_on_synthetic(sae, model, n_samples=10)
    assert e.value.field == "d_in" and "hidden_dim" in str(e.value)


@pytest.mark.interop
def test_matches_saelens_reference_calculators(fakes):
    ref = pytest.importorskip("sae_lens.synthetic.evals")
    from sae_lens.evals import ExplainedVarianceCalculator as RefEV

    model = fakes.PoolModel(300, num_features=10, hidden_dim=8, p=0.25, bias=1.5, seed=8)
    sae = fakes.ReluSAE(SAEConfig(d_in=8, d_sae=12))
    sae.reset_parameters(torch.Generator().manual_seed(9))
    with torch.no_grad():
        sae.W_dec_LD.mul_(10)
        # SAELens ignores the sign of a match; saelab counts a firing that writes −f as no detection of f
        # (test_signed_matching.py). Point every row along its match, where the two definitions agree.
        best_L = match_decoder_to_features(sae.W_dec_LD, model.feature_vectors_FD, hungarian=False).best_match_L
        sae.W_dec_LD.mul_(match_signs(sae.W_dec_LD, model.feature_vectors_FD, best_L)[:, None].float())
    ours = evaluate_sae_on_synthetic(sae, model, n_samples=300, batch_size=64)

    x, a = model.hidden_ND, model.acts_NF
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    W, feats = sae.W_dec_LD.detach(), model.feature_vectors_FD
    cls = ref.ClassificationMetricsCalculator(W, feats)
    cls.add_batch(f, a)
    c = cls.compute()
    ev, sh, l0, tl0, dead = (
        RefEV(),
        ref.ShrinkageCalculator(),
        ref.L0Calculator(),
        ref.L0Calculator(),
        ref.DeadLatentsCalculator(12),
    )
    ev.add_batch(x_hat, x)
    sh.add_batch(x_hat, x)
    l0.add_batch(f)
    tl0.add_batch(a)
    dead.add_batch(f)
    expected = {
        "f1": c.f1_score, "precision": c.precision, "recall": c.recall, "accuracy": c.accuracy,
        "mcc": ref.mean_correlation_coefficient(W, feats), "uniqueness": ref.feature_uniqueness(W, feats),
        "explained_variance": ev.compute(), "shrinkage": sh.compute(), "l0": l0.compute(),
        "true_l0": tl0.compute(), "dead_latents": dead.compute(),
    }  # fmt: skip
    got = ours.to_dict()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert 0.05 < got["f1"] < 0.95 and got["dead_latents"] < 12


def test_model_with_wrong_shapes_names_the_field(fakes):
    model = fakes.ToyModel(num_features=4, hidden_dim=4)
    sae = fakes.make_oracle(model)
    model.num_features = 5  # feature_vectors_FD no longer [num_features, hidden_dim]
    with pytest.raises(ConfigError) as e:
        evaluate_sae_on_synthetic(sae, model, n_samples=10)
    assert e.value.field == "feature_vectors_FD"

    model = fakes.ToyModel(num_features=4, hidden_dim=4)
    real = model.sample_with_features
    model.sample_with_features = lambda b: (real(b)[0], real(b)[1][:, :3])
    with pytest.raises(ConfigError) as e:
        evaluate_sae_on_synthetic(sae, model, n_samples=10)
    assert e.value.field == "sample_with_features"


def test_seed_uses_and_restores_the_models_own_generator(fakes):
    model = fakes.ToyModel(num_features=4, hidden_dim=4, seed=11)  # samples from model.generator
    sae = fakes.ReluSAE(SAEConfig(d_in=4, d_sae=5))
    before = model.generator.get_state()
    r1 = evaluate_sae_on_synthetic(sae, model, n_samples=40, seed=3)
    assert torch.equal(model.generator.get_state(), before)
    r2 = evaluate_sae_on_synthetic(sae, model, n_samples=40, seed=3)
    r3 = evaluate_sae_on_synthetic(sae, model, n_samples=40, seed=4)
    assert r1.to_dict() == r2.to_dict() != r3.to_dict()
