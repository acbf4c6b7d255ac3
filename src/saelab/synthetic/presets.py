"""Named synthetic-model configurations.

synth-16k  SynthSAEBench-16k v2 (SAELens `experiments/create_synth_bench_16k_model.py`, with
           scale_children_by_parent=True, the fix that distinguishes v2 from v1).
           Reference statistics: true L0 ≈ 34.5, L0 of features 0..4095 ≈ 25.1, mean-max |cos| ≈ 0.149.
synth-mini The same recipe at 4096 features / 256 dims, 32 roots, rank 25.
           Reference (SAELens): true L0 ≈ 15.9, L0 of features 0..1023 ≈ 12.1.
sbw-toy    The "Sparse but Wrong" toy model (Chanin et al., notebooks/main_toy_model_experiments):
           50 features in 100 dims, orthogonalised (1000 Adam steps, lr 0.01), p_i falling
           linearly 0.388 → 0.05, strong random correlations (seed 42), magnitude 1 ± 0.15, no
           hierarchy, no bias. True L0 ≈ 11 (Σ p_i = 10.95).
"""

from __future__ import annotations

from typing import Callable

from saelab.errors import ConfigError
from saelab.synthetic.config import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearFiringProbabilityConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    RandomCorrelationConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)

# Reference statistics quoted next to our own in `describe` and the benchmark.
REFERENCE_STATS: dict[str, dict[str, float]] = {
    "synth-16k": {"true_l0": 34.5, "l0_first_width": 25.1, "width": 4096, "mean_max_abs_cos": 0.149},
    "synth-mini": {"true_l0": 15.9, "l0_first_width": 12.1, "width": 1024},
    "sbw-toy": {"true_l0": 11.0},
}


def _synthsaebench(num_features: int, hidden_dim: int, roots: int, rank: int) -> SyntheticModelConfig:
    return SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=roots,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=rank, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def _synth_16k() -> SyntheticModelConfig:
    return _synthsaebench(16_384, 768, roots=128, rank=25)


def _synth_mini() -> SyntheticModelConfig:
    return _synthsaebench(4096, 256, roots=32, rank=25)


def _sbw_toy() -> SyntheticModelConfig:
    num_features = 50
    # p_i = 0.345 (50 - i - 1) / 50 + 0.05 is exactly linear from p_0 to p_49 = 0.05.
    return SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=100,
        firing_probability=LinearFiringProbabilityConfig(max_prob=0.345 * (num_features - 1) / num_features + 0.05, min_prob=0.05),
        hierarchy=None,
        orthogonalization=OrthogonalizationConfig(num_steps=1000, lr=0.01),
        correlation=RandomCorrelationConfig(
            positive_ratio=0.5, uncorrelated_ratio=0.3, min_strength=0.3, max_strength=0.9, seed=42
        ),
        mean_firing_magnitudes=1.0,
        std_firing_magnitudes=0.15,
        bias=False,
        seed=42,
    )


_PRESETS: dict[str, Callable[[], SyntheticModelConfig]] = {
    "synth-16k": _synth_16k,
    "synth-mini": _synth_mini,
    "sbw-toy": _sbw_toy,
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> SyntheticModelConfig:
    """A fresh config for the named preset; unknown names raise ConfigError listing the valid ones."""
    factory = _PRESETS.get(name)
    if factory is None:
        raise ConfigError("preset", name, f"unknown preset; valid presets are {', '.join(list_presets())}")
    return factory()
