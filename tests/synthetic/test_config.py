"""Config values, validation errors and (de)serialisation."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.synthetic import (
    ConstantFiringProbabilityConfig,
    ExponentialMagnitudeConfig,
    FoldedNormalMagnitudeConfig,
    FullCorrelationConfig,
    HierarchyConfig,
    LinearFiringProbabilityConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    RandomCorrelationConfig,
    RandomFiringProbabilityConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    generate_magnitudes,
    get_preset,
)


def test_zipf_values_of_the_16k_config():
    p = get_preset("synth-16k").firing_probability.generate(16_384)
    # p_r = min + (max - min) (r^-1/2 - q_min) / (1 - q_min), q_min = 16384^-1/2 = 1/128.
    q_min = 1 / 128

    def expected(r: int) -> float:
        return 5e-4 + (0.4 - 5e-4) * (r**-0.5 - q_min) / (1 - q_min)

    assert p[0].item() == pytest.approx(0.4, abs=1e-7)
    assert p[9].item() == pytest.approx(expected(10), rel=1e-6)
    assert p[9].item() == pytest.approx(0.125, abs=5e-4)  # the spec's quoted p_10
    assert p[-1].item() == pytest.approx(5e-4, rel=1e-5)
    for r in (2, 128, 4096):
        assert p[r - 1].item() == pytest.approx(expected(r), rel=1e-5)
    assert torch.all(p[1:] <= p[:-1])  # descending with index
    assert p.sum().item() == pytest.approx(59.1, abs=0.1)  # Σp quoted in the spec


def test_linear_random_constant_firing():
    p = LinearFiringProbabilityConfig(max_prob=0.3, min_prob=0.1).generate(5)
    assert torch.allclose(p, torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]))
    r1 = RandomFiringProbabilityConfig(max_prob=0.5, min_prob=0.1).generate(1000, seed=3)
    r2 = RandomFiringProbabilityConfig(max_prob=0.5, min_prob=0.1).generate(1000, seed=3)
    assert torch.equal(r1, r2) and r1.min() >= 0.1 and r1.max() <= 0.5
    assert r1.mean().item() == pytest.approx(0.3, abs=0.015)  # U[0.1, 0.5]: sd of mean 0.0037
    assert torch.equal(ConstantFiringProbabilityConfig(0.2).generate(3), torch.full((3,), 0.2))


def test_magnitude_generators():
    lin = generate_magnitudes(5, LinearMagnitudeConfig(start=5.0, end=4.0))
    assert torch.allclose(lin, torch.tensor([5.0, 4.75, 4.5, 4.25, 4.0]))
    exp = generate_magnitudes(3, ExponentialMagnitudeConfig(start=1.0, end=4.0))
    assert torch.allclose(exp, torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(generate_magnitudes(4, 0.15), torch.full((4,), 0.15))
    fn = FoldedNormalMagnitudeConfig(mean=0.5, std=0.5)
    a, b = generate_magnitudes(20_000, fn, seed=43), generate_magnitudes(20_000, fn, seed=43)
    assert torch.equal(a, b) and (a >= 0).all()
    # E|N(μ,σ²)| = σ√(2/π) e^{-μ²/2σ²} + μ(1 − 2Φ(−μ/σ)); here ≈ 0.5833. sd of the mean ≈ 0.0026.
    mu, sd = 0.5, 0.5
    folded_mean = sd * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sd**2)) + mu * math.erf(
        mu / (sd * math.sqrt(2))
    )
    assert a.mean().item() == pytest.approx(folded_mean, abs=0.012)
    clamped = generate_magnitudes(
        1000, FoldedNormalMagnitudeConfig(mean=0.0, std=1.0, min_value=0.2, max_value=0.5), seed=1
    )
    assert clamped.min() >= 0.2 and clamped.max() <= 0.5


@pytest.mark.parametrize(
    "make, field",
    [
        (
            lambda: ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.1, min_prob=0.2),
            "firing_probability.min_prob",
        ),
        (lambda: ZipfianFiringProbabilityConfig(exponent=-1.0), "firing_probability.exponent"),
        (lambda: LinearFiringProbabilityConfig(max_prob=1.5, min_prob=0.1), "firing_probability.max_prob"),
        (lambda: ConstantFiringProbabilityConfig(probability=2.0), "firing_probability.probability"),
        (lambda: LinearMagnitudeConfig(start=-1.0, end=4.0), "magnitude.start"),
        (lambda: FoldedNormalMagnitudeConfig(mean=0.5, std=0.0), "magnitude.std"),
        (lambda: HierarchyConfig(branching_factor=1), "hierarchy.branching_factor"),
        (lambda: HierarchyConfig(branching_factor=(5, 3)), "hierarchy.branching_factor"),
        (lambda: HierarchyConfig(max_depth=0), "hierarchy.max_depth"),
        (lambda: HierarchyConfig(mutually_exclusive_portion=1.5), "hierarchy.mutually_exclusive_portion"),
        (lambda: LowRankCorrelationConfig(rank=0), "correlation.rank"),
        (lambda: LowRankCorrelationConfig(correlation_scale=-0.1), "correlation.correlation_scale"),
        (lambda: RandomCorrelationConfig(min_strength=0.9, max_strength=0.3), "correlation.min_strength"),
        (lambda: OrthogonalizationConfig(lr=0.0), "orthogonalization.lr"),
        (lambda: SyntheticModelConfig(num_features=0, hidden_dim=4), "num_features"),
        (lambda: SyntheticModelConfig(num_features=4, hidden_dim=-2), "hidden_dim"),
        (lambda: SyntheticModelConfig(num_features=4, hidden_dim=2, bias=-1.0), "bias"),
        (lambda: SyntheticModelConfig(num_features=4, hidden_dim=2, dtype="int8"), "dtype"),
        (
            lambda: SyntheticModelConfig(num_features=4, hidden_dim=2, std_firing_magnitudes=-0.1),
            "std_firing_magnitudes",
        ),
        (lambda: FullCorrelationConfig(matrix=[[1.0, 0.5], [0.4, 1.0]]), "correlation.matrix"),  # asymmetric
        (lambda: FullCorrelationConfig(matrix=[[2.0, 0.0], [0.0, 1.0]]), "correlation.matrix"),  # diagonal ≠ 1
        (
            lambda: FullCorrelationConfig(matrix=[[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]]),
            "correlation.matrix",
        ),  # not PSD
        (
            lambda: SyntheticModelConfig(
                num_features=3, hidden_dim=2, correlation=FullCorrelationConfig([[1.0, 0.0], [0.0, 1.0]])
            ),
            "correlation.matrix",
        ),
    ],
)
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field
    assert field in str(info.value)


def test_from_dict_errors_name_the_field():
    d = get_preset("synth-mini").to_dict()
    d["firing_probability"]["generator_name"] = "pareto"
    with pytest.raises(ConfigError, match=r"firing_probability\.generator_name='pareto'"):
        SyntheticModelConfig.from_dict(d)
    d = get_preset("synth-mini").to_dict()
    d["mean_firing_magnitudes"]["start"] = -2.0
    with pytest.raises(ConfigError, match=r"mean_firing_magnitudes\.start=-2\.0"):
        SyntheticModelConfig.from_dict(d)
    d = get_preset("synth-mini").to_dict()
    d["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        SyntheticModelConfig.from_dict(d)


@pytest.mark.parametrize("name", ["synth-16k", "synth-mini", "sbw-toy"])
def test_config_round_trips_through_dict(name):
    cfg = get_preset(name)
    again = SyntheticModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_parses_a_saelens_style_config_dict():
    # The exact layout SAELens 6.54 writes (synthetic_model_config.json), tuple branching as a list.
    d = {
        "num_features": 40,
        "hidden_dim": 16,
        "firing_probability": {"exponent": 0.5, "max_prob": 0.4, "min_prob": 0.005, "generator_name": "zipfian"},
        "hierarchy": {
            "total_root_nodes": 2,
            "branching_factor": [2, 3],
            "max_depth": 2,
            "mutually_exclusive_portion": 0.5,
            "mutually_exclusive_min_depth": 0,
            "mutually_exclusive_max_depth": None,
            "compensate_probabilities": True,
            "scale_children_by_parent": True,
        },
        "orthogonalization": {"num_steps": 3, "lr": 0.0003, "chunk_size": 1024},
        "correlation": {"rank": 4, "correlation_scale": 0.1, "seed": None},
        "std_firing_magnitudes": {
            "mean": 0.5,
            "std": 0.5,
            "min_value": None,
            "max_value": None,
            "generator_name": "folded_normal",
        },
        "mean_firing_magnitudes": {"start": 5.0, "end": 4.0, "generator_name": "linear"},
        "bias": 0.5,
        "dtype": "float32",
        "seed": 42,
    }
    cfg = SyntheticModelConfig.from_dict(d)
    assert cfg.hierarchy.branching_factor == (2, 3)
    assert isinstance(cfg.correlation, LowRankCorrelationConfig) and cfg.correlation.rank == 4
    assert isinstance(cfg.std_firing_magnitudes, FoldedNormalMagnitudeConfig)
    assert cfg.to_dict() == d  # writes back the same layout


def test_sbw_toy_probabilities_match_the_paper_formula():
    p = get_preset("sbw-toy").firing_probability.generate(50)
    i = torch.arange(50, dtype=torch.float32)
    assert torch.allclose(p, 0.345 * (50 - i - 1) / 50 + 0.05, atol=1e-6)
    assert p.sum().item() == pytest.approx(50 * (0.3881 + 0.05) / 2, abs=1e-4)  # = 10.9525


def test_bf16_products_leave_orthogonalisation_statistics_unchanged():
    import torch

    from saelab.synthetic import orthogonalize
    from saelab.synthetic.orthogonalize import orthogonality_loss
    from saelab.synthetic.stats import mean_max_abs_cos

    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2048, 96, generator=g)
    exact = orthogonalize(vectors, num_steps=60, lr=1e-2, matmul_dtype=None)
    fast = orthogonalize(vectors, num_steps=60, lr=1e-2, matmul_dtype=torch.bfloat16)
    start = mean_max_abs_cos(vectors / vectors.norm(dim=1, keepdim=True))
    # The run moves the statistic (by ~0.008) 40x more than the two paths differ (~2e-5 measured).
    assert start - mean_max_abs_cos(exact) > 0.005
    assert abs(mean_max_abs_cos(fast) - mean_max_abs_cos(exact)) < 2e-4
    assert float(orthogonality_loss(fast)) == pytest.approx(float(orthogonality_loss(exact)), rel=1e-5)
