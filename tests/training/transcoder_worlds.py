"""Small transcoder worlds for tests (seconds to build and to train on)."""

from __future__ import annotations

from typing import Any

import torch

from saelab.synthetic import (
    LinearMagnitudeConfig,
    SyntheticModelConfig,
    TranscoderWorld,
    TranscoderWorldConfig,
    ZipfianFiringProbabilityConfig,
)


def small_world(skip_scale: float = 1.5, **overrides) -> TranscoderWorld:
    """512 input features in 16 dimensions (Zipf firing 0.1 → 0.002, true L0 ≈ 3), d_out 32, two of each
    computing kind. Most features are rare, so x carries much that no small transcoder gives a latent:
    what pins the learned skip (see test_transcoder_training.py)."""
    inp = SyntheticModelConfig(
        num_features=512,
        hidden_dim=16,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.1, min_prob=0.002),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=2.0, end=1.5),
        std_firing_magnitudes=0.2,
        bias=0.3,
        seed=5,
    )
    kw: dict[str, Any] = dict(
        input=inp,
        d_out=32,
        num_fanout=2,
        num_and=2,
        num_suppression=2,
        skip_scale=skip_scale,
        noise_std=0.05,
        min_cofire_rate=0.003,
        pilot_samples=16384,
        seed=7,
    )
    kw.update(overrides)
    return TranscoderWorld(TranscoderWorldConfig(**kw))


def least_squares_skip(world: TranscoderWorld, n: int = 50_000) -> torch.Tensor:
    """The best linear map from x to y (with an intercept), [d_out, d_in]: what a skip can reach alone."""
    with world.forked_stream(123):
        x_ND, y_NE = world.sample(n)
    X_ND1 = torch.cat([x_ND, torch.ones(n, 1)], dim=1).double()
    return torch.linalg.lstsq(X_ND1, y_NE.double()).solution[:-1].T
