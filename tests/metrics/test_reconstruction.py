"""Explained variance (about the mean), MSE, shrinkage, L0, dead latents, evaluate_reconstruction."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics import (
    DeadLatentsCalculator,
    ExplainedVarianceCalculator,
    L0Calculator,
    MSECalculator,
    ReconstructionCalculator,
    ShrinkageCalculator,
    evaluate_reconstruction,
)


def test_explained_variance_hand_case_is_about_the_mean():
    # x = (1, 0), (3, 0): E‖x‖² = 5, ‖E x‖² = 4 → total variance 1.
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    ev = ExplainedVarianceCalculator()
    ev.update(x, torch.tensor([[1.5, 0.0], [2.5, 0.0]]))  # E‖x − x̂‖² = 0.25
    assert ev.total_variance() == pytest.approx(1.0)
    assert ev.mse() == pytest.approx(0.25)
    assert ev.compute() == pytest.approx(0.75)  # about 0 it would be 1 − 0.25/5 = 0.95 (SAELens #665)

    mean_pred = ExplainedVarianceCalculator()
    mean_pred.update(x, torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    assert mean_pred.compute() == pytest.approx(0.0)
    perfect = ExplainedVarianceCalculator()
    perfect.update(x, x)
    assert perfect.compute() == 1.0


def test_mean_predictor_scores_zero_even_with_a_large_offset_and_many_batches():
    gen = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(600, 16, generator=gen)  # float32, ‖mean‖² ≫ variance
    mean = x.double().mean(dim=0).float()
    ev = ExplainedVarianceCalculator()
    for chunk in x.split(64):
        ev.update(chunk, mean.expand_as(chunk))
    assert ev.compute() == pytest.approx(0.0, abs=1e-5)
    assert ev.total_variance() == pytest.approx(float(x.double().var(dim=0, unbiased=False).sum()), rel=1e-9)


def test_degenerate_variance_follows_saelens():
    x = torch.ones(3, 2)
    ev = ExplainedVarianceCalculator()
    ev.update(x, x)
    assert ev.compute() == 1.0
    ev2 = ExplainedVarianceCalculator()
    ev2.update(x, x + 1)
    assert ev2.compute() == 0.0


def test_shrinkage_mse_l0_dead_hand_cases():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    x_hat = torch.tensor([[1.5, 2.0], [5.0, 5.0], [2.0, 0.0]])
    sh = ShrinkageCalculator()
    sh.update(x, x_hat)
    assert sh.compute() == pytest.approx((0.5 + 2.0) / 2)  # the zero-norm sample is skipped
    mse = MSECalculator()
    mse.update(x, x_hat)
    assert mse.compute() == pytest.approx((1.5**2 + 2**2 + 50 + 1) / 3)  # summed over dims, mean over samples

    acts = torch.tensor([[0.0, -1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    l0, dead = L0Calculator(), DeadLatentsCalculator(4)
    l0.update(acts)
    dead.update(acts)
    assert l0.compute() == pytest.approx(3 / 3)
    assert dead.compute() == 2  # latents 0 and 3
    assert dead.fire_count_L.tolist() == [0, 1, 2, 0]


def test_streaming_equals_one_batch():
    gen = torch.Generator().manual_seed(1)
    x = 5 + torch.randn(97, 6, generator=gen)
    x_hat = x + 0.3 * torch.randn(97, 6, generator=gen)
    acts = torch.relu(torch.randn(97, 5, generator=gen) - 1)
    one, many = ReconstructionCalculator(5), ReconstructionCalculator(5)
    one.update(x, acts, x_hat)
    for s, e in [(0, 1), (1, 50), (50, 97)]:
        many.update(x[s:e], acts[s:e], x_hat[s:e])
    a, b = one.compute(), many.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), k
    # Against the formula written out directly.
    x64, e64 = x.double(), (x - x_hat).double()
    direct = 1 - e64.pow(2).sum(1).mean() / (x64.pow(2).sum(1).mean() - x64.mean(0).pow(2).sum())
    assert a["explained_variance"] == pytest.approx(float(direct), rel=1e-9)


def test_evaluate_reconstruction_with_mean_and_perfect_plain_saes(fakes):
    gen = torch.Generator().manual_seed(2)
    batches = [3 + torch.randn(20, 4, generator=gen) for _ in range(3)]
    mean_D = torch.cat(batches).double().mean(0).float()
    W = torch.randn(5, 4, generator=gen)
    mean_sae = fakes.plain_sae(W, lambda x: torch.zeros(x.shape[0], 5), lambda a: mean_D.expand(a.shape[0], 4))
    out = evaluate_reconstruction(mean_sae, iter(batches))
    assert out["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert out["dead_latents"] == 5 and out["l0"] == 0 and out["n_samples"] == 60

    perfect = fakes.plain_sae(W, lambda x: torch.cat([x, torch.zeros(x.shape[0], 1)], 1), lambda a: a[:, :4])
    out = evaluate_reconstruction(perfect, batches)
    assert out["explained_variance"] == 1.0 and out["mse"] == 0.0 and out["shrinkage"] == pytest.approx(1.0)
    assert out["dead_latents"] == 1


def test_evaluate_reconstruction_real_sae_and_bad_input(fakes):
    from saelab.saes.base import SAEConfig

    sae = fakes.ReluSAE(SAEConfig(d_in=4, d_sae=6))
    sae.train()
    out = evaluate_reconstruction(sae, [torch.randn(10, 4), torch.randn(3, 4)])
    assert out["n_samples"] == 13 and sae.training  # mode restored
    with pytest.raises(ConfigError) as e:
        evaluate_reconstruction(sae, [torch.randn(10, 5)])
    assert e.value.field == "batches[0]"
    with pytest.raises(ConfigError) as e:
        evaluate_reconstruction(sae, [])
    assert e.value.field == "batches"
    with pytest.raises(ConfigError) as e:
        evaluate_reconstruction(sae, [torch.randn(2, 4)], device="meta")
    assert e.value.field == "device"
    with pytest.raises(ConfigError) as e:
        ExplainedVarianceCalculator().update(torch.randn(3, 4), torch.randn(3, 5))
    assert e.value.field == "x_hat_BD"


def test_sparse_codes_from_encode_are_densified(fakes):
    from saelab.saes.base import SparseActs

    W = torch.eye(3)

    def encode(x):  # latent 2 never fires
        b = torch.arange(x.shape[0]).repeat_interleave(2)
        j = torch.tensor([0, 1]).repeat(x.shape[0])
        return SparseActs(b, j, x[:, :2].reshape(-1), x.shape[0], 3)

    sae = fakes.plain_sae(W, encode, lambda a: a @ W)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    out = evaluate_reconstruction(sae, [x])
    assert out["dead_latents"] == 1 and out["l0"] == pytest.approx(1.5) and out["explained_variance"] == 1.0
