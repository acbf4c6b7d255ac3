"""Shared builders for the synthetic-model tests (imported as `synth_helpers`)."""

from __future__ import annotations

from saelab.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)


def small_config(**overrides) -> SyntheticModelConfig:
    """A SynthSAEBench-like model small enough to sample densely in tests."""
    kw = dict(
        num_features=400,
        hidden_dim=32,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-3),
        hierarchy=HierarchyConfig(
            total_root_nodes=6,
            branching_factor=(2, 4),
            max_depth=3,
            mutually_exclusive_portion=0.7,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=5, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=5, correlation_scale=0.2),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=7,
    )
    kw.update(overrides)
    return SyntheticModelConfig(**kw)
