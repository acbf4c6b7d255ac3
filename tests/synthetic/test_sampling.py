"""Firing (copula), magnitudes, reproducibility, and dense-vs-sparse agreement."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import multivariate_normal, norm

from saelab.errors import ConfigError
from saelab.synthetic import (
    FullCorrelationConfig,
    LinearFiringProbabilityConfig,
    LowRankCorrelationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    generate_low_rank_correlation,
)
from saelab.synthetic.sampling import (
    bernoulli_positions,
    decode_sparse,
    draw_firing,
    draw_firing_reference,
    hash_uniform,
    make_firing_plan,
    mix64_int,
)
from tests.synthetic.synth_helpers import small_config

# Each statistical check below fails by chance (for a correct sampler) with probability at most this; bounds
# on sampled quantities are derived from it and the sample count, never hand-picked.
FALSE_FAILURE = 1e-4

# Firing probabilities spanning frequent (dense draw) and rare (sparse buckets) features.
PROBS = torch.tensor([0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001] * 4)


def _rates(b: torch.Tensor, f: torch.Tensor, n: int, F: int) -> torch.Tensor:
    return torch.bincount(f, minlength=F).double() / n


def _firing_sets(plan, n: int, batch: int, seed: int, reference: bool = False):
    gen = torch.Generator().manual_seed(seed)
    fired = []
    for _ in range(n // batch):
        if reference:
            b, f = draw_firing_reference(plan, batch, gen)
        else:
            b, f, _ = draw_firing(plan, batch, gen)
        dense = torch.zeros(batch, plan.num_features, dtype=torch.bool)
        dense[b, f] = True
        fired.append(dense)
    return torch.cat(fired)


@pytest.mark.parametrize("correlated", [False, True])
def test_copula_marginals_match_p(correlated):
    F = PROBS.numel()
    lr = generate_low_rank_correlation(F, rank=4, correlation_scale=0.3, seed=1) if correlated else None
    plan = make_firing_plan(PROBS, factor_FR=lr.factor_FR if lr else None, diag_F=lr.diag_F if lr else None)
    assert plan.sparse_features.numel() > 0 and plan.dense_features.numel() > 0  # both code paths used
    n = 200_000
    fired = _firing_sets(plan, n, 20_000, seed=2)
    rate = fired.double().mean(0)
    z = (rate - PROBS.double()) / (PROBS.double() * (1 - PROBS.double()) / n).sqrt()
    # 40 features, binomial z-scores; Bonferroni: the largest |z| passes its bound (4.85) but for FALSE_FAILURE.
    assert z.abs().max() < norm.isf(FALSE_FAILURE / (2 * F)), z


def test_low_rank_latent_correlation():
    lr = generate_low_rank_correlation(30, rank=3, correlation_scale=0.4, seed=5)
    sigma = lr.factor_FR @ lr.factor_FR.T + torch.diag(lr.diag_F)
    assert torch.allclose(torch.diag(sigma), torch.ones(30), atol=1e-6)  # unit diagonal by construction
    g = torch.Generator().manual_seed(0)
    n = 200_000
    eps = torch.randn(n, 3, generator=g)
    eta = torch.randn(n, 30, generator=g)
    z = eps @ lr.factor_FR.T + eta * lr.diag_F.sqrt()  # the sampler's construction
    emp = torch.corrcoef(z.T)
    # Sample correlations of Gaussians have sd ≈ (1 − ρ²)/√n ≤ 1/√n; Bonferroni over the 435 pairs.
    pairs = 30 * 29 // 2
    assert (emp - sigma).abs().max() < norm.isf(FALSE_FAILURE / (2 * pairs)) / math.sqrt(n)


def test_low_rank_rows_are_capped():
    lr = generate_low_rank_correlation(200, rank=10, correlation_scale=0.5, seed=0)  # ‖F_i‖² ≈ 2.5 > 1
    assert (lr.diag_F >= 0.01 - 1e-6).all()
    assert torch.allclose((lr.factor_FR**2).sum(1) + lr.diag_F, torch.ones(200), atol=1e-5)


@pytest.mark.parametrize("reference", [False, True])
def test_pairwise_cofiring_matches_bivariate_normal(reference):
    # Strong correlations so joint firing is far from independent; fast and reference draws must
    # both hit the Gaussian-copula orthant probabilities P(z_i > t_i, z_j > t_j).
    probs = torch.tensor([0.3, 0.1, 0.03, 0.01, 0.3, 0.1, 0.03, 0.01])
    lr = generate_low_rank_correlation(8, rank=2, correlation_scale=0.6, seed=11)
    plan = make_firing_plan(probs, factor_FR=lr.factor_FR, diag_F=lr.diag_F)
    n = 200_000
    fired = _firing_sets(plan, n, 20_000, seed=4, reference=reference).double()
    joint = fired.T @ fired / n
    rho = (lr.factor_FR @ lr.factor_FR.T).double()
    t = norm.isf(probs.double().numpy())
    max_z = 0.0
    for i in range(8):
        for j in range(i + 1, 8):
            r = float(rho[i, j])
            p_ij = multivariate_normal(mean=[0, 0], cov=[[1, r], [r, 1]]).cdf([-t[i], -t[j]])
            se = math.sqrt(max(p_ij * (1 - p_ij), 1e-12) / n)
            max_z = max(max_z, abs(float(joint[i, j]) - p_ij) / se)
            if i == 0 and j == 4:
                assert abs(r) > 0.1  # the test really exercises correlation
    assert max_z < norm.isf(FALSE_FAILURE / (2 * 28))  # Bonferroni over the 28 pairs: 4.63


def test_magnitudes_mean_and_std():
    cfg = SyntheticModelConfig(
        num_features=20,
        hidden_dim=8,
        firing_probability=LinearFiringProbabilityConfig(max_prob=0.5, min_prob=0.05),
        mean_firing_magnitudes=3.0,
        std_firing_magnitudes=0.5,
        seed=0,
    )
    model = SyntheticModel(cfg)
    acts = model.sample_features_sparse(100_000)
    v = acts.values.double()
    n = v.numel()
    # ReLU never bites at 6σ; mean sd = 0.5/√n ≈ 0.0005, std sd ≈ 0.5/√(2n) ≈ 0.0004.
    assert v.mean().item() == pytest.approx(3.0, abs=5 * 0.5 / math.sqrt(n))
    assert v.std().item() == pytest.approx(0.5, abs=5 * 0.5 / math.sqrt(2 * n))
    assert (v > 0).all()


def test_magnitudes_are_relud():
    cfg = SyntheticModelConfig(
        num_features=5,
        hidden_dim=4,
        mean_firing_magnitudes=0.0,
        std_firing_magnitudes=1.0,
        firing_probability=LinearFiringProbabilityConfig(0.5, 0.5),
        seed=0,
    )
    acts = SyntheticModel(cfg).sample_features_sparse(20_000)
    # Half the firing events get a negative magnitude and are dropped: active rate 0.25, not 0.5.
    assert (acts.values > 0).all()
    n = 20_000 * 5  # independent Bernoulli(0.25) entries
    assert acts.nnz / n == pytest.approx(0.25, abs=norm.isf(FALSE_FAILURE / 2) * math.sqrt(0.25 * 0.75 / n))


def test_same_seed_same_stream_different_seed_different():
    a, b = SyntheticModel(small_config()), SyntheticModel(small_config())
    assert torch.equal(a.sample(300), b.sample(300))
    assert torch.equal(a.sample(300), b.sample(300))  # the streams stay in step
    c = SyntheticModel(small_config(seed=8))
    assert not torch.equal(c.feature_vectors_FD, a.feature_vectors_FD)
    a.manual_seed(99)
    x = a.sample(200)
    a.manual_seed(99)
    assert torch.equal(a.sample(200), x)
    d = SyntheticModel(small_config(), sample_seed=123)
    assert torch.equal(d.feature_vectors_FD, a.feature_vectors_FD)
    assert not torch.equal(d.sample(200), SyntheticModel(small_config()).sample(200))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # low rank + hierarchy (lazy children)
        {"correlation": None},  # independent + hierarchy
        {"hierarchy": None},  # low rank, no hierarchy
        {
            "num_features": 60,
            "correlation": FullCorrelationConfig(matrix=(0.2 * torch.ones(60, 60) + 0.8 * torch.eye(60)).tolist()),
        },  # full matrix + hierarchy
    ],
)
def test_dense_and_sparse_paths_give_identical_samples(overrides):
    model = SyntheticModel(small_config(**overrides))
    for seed in (0, 1):
        model.manual_seed(seed)
        hidden_s, acts = model.sample_sparse(1500)
        model.manual_seed(seed)
        hidden_d, acts_BF = model.sample_with_features(1500, reference=True)
        assert acts_BF.shape == (1500, model.num_features)
        assert torch.equal(acts.to_dense(), acts_BF)
        # Same activations; only the float summation order of the decode differs.
        assert torch.allclose(hidden_s, hidden_d, atol=1e-4, rtol=1e-5)
        assert acts.nnz > 1500  # non-trivial
    b, f = acts.batch_idx, acts.feature_idx
    key = b * model.num_features + f
    assert torch.all(key[1:] > key[:-1])  # sorted by (batch, feature), no duplicates


def test_decode_sparse_equals_dense_matmul():
    model = SyntheticModel(small_config())
    _, acts = model.sample_sparse(500)
    expected = acts.to_dense() @ model.feature_vectors_FD + model.bias_D
    assert torch.allclose(decode_sparse(acts, model.feature_vectors_FD, model.bias_D), expected, atol=1e-5)
    dense_sparse = acts.to_torch_sparse().to_dense()
    assert torch.equal(dense_sparse, acts.to_dense())


def test_sample_shapes_and_errors():
    model = SyntheticModel(small_config())
    assert model.sample(3).shape == (3, 32)
    assert model(2).shape == (2, 32)
    with pytest.raises(ConfigError, match="batch_size"):
        model.sample(0)


def test_bernoulli_positions_counts_and_order():
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        pos = bernoulli_positions(10_000, 0.01, g, torch.device("cpu"))
        assert pos.numel() == 0 or (pos.min() >= 0 and pos.max() < 10_000)
        assert torch.all(pos[1:] > pos[:-1])
        counts.append(pos.numel())
    c = torch.tensor(counts, dtype=torch.float64)
    # Binomial(10000, 0.01): mean 100, var 99. Over 400 runs: sd of mean 0.5, of var ≈ 7.
    assert c.mean().item() == pytest.approx(100, abs=2.5)
    assert c.var().item() == pytest.approx(99, abs=30)
    # A run longer than the initial draw budget (tiny grid, many successes) must continue correctly.
    pos = bernoulli_positions(50, 0.9, g, torch.device("cpu"))
    assert pos.numel() <= 50 and torch.all(pos[1:] > pos[:-1])


def test_hash_uniform_matches_reference_and_is_uniform():
    idx = torch.tensor([0, 1, 2, 12345678901, 2**62], dtype=torch.long)
    key = mix64_int(7)
    got = hash_uniform(idx, key)
    golden = 0x9E3779B97F4A7C15
    for i, u in zip(idx.tolist(), got.tolist()):
        z = mix64_int((i * golden + key) & ((1 << 64) - 1)) & ((1 << 64) - 1)  # wrapping arithmetic in Python
        assert u == ((z >> 11) + 0.5) * 2.0**-53
    u = hash_uniform(torch.arange(200_000), mix64_int(1))
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    # 10000 expected per bin, sd 98: allow 5 sd.
    assert (hist - 10_000).abs().max() < 490
    assert 0 < u.min() and u.max() < 1


def test_low_rank_config_seed_field_is_ignored_like_saelens():
    a = SyntheticModel(small_config(correlation=LowRankCorrelationConfig(rank=5, correlation_scale=0.2, seed=None)))
    b = SyntheticModel(small_config(correlation=LowRankCorrelationConfig(rank=5, correlation_scale=0.2, seed=999)))
    assert torch.equal(a.low_rank.factor_FR, b.low_rank.factor_FR)


def test_to_device_and_thread_setting_keep_the_stream():
    a, b = SyntheticModel(small_config()), SyntheticModel(small_config())
    a.to("cpu")  # moving restarts the stream from sample_seed: still the same stream here
    assert a.device == torch.device("cpu")
    b.sample_threads = None  # use torch's global thread setting instead of one thread
    assert torch.equal(a.sample(300), b.sample(300))
    before = torch.get_num_threads()
    a.sample(10)
    assert torch.get_num_threads() == before  # the scoped thread setting is restored


def test_sample_with_features_default_is_the_fast_draw_densified():
    model = SyntheticModel(small_config())
    model.manual_seed(4)
    hidden_s, acts = model.sample_sparse(700)
    model.manual_seed(4)
    hidden_d, acts_BF = model.sample_with_features(700)
    assert torch.equal(hidden_s, hidden_d)
    assert torch.equal(acts.to_dense(), acts_BF)
