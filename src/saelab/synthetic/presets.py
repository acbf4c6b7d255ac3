"""Named synthetic-model configurations.

synth-16k  SynthSAEBench-16k v2 (SAELens `experiments/create_synth_bench_16k_model.py`, with
           scale_children_by_parent=True, the fix that distinguishes v2 from v1).
           Reference statistics: true L0 ≈ 34.5, L0 of features 0..4095 ≈ 25.1, mean-max |cos| ≈ 0.149.
synth-mini The same recipe at 4096 features / 256 dims, 32 roots, rank 25.
           Reference (SAELens): true L0 ≈ 15.9, L0 of features 0..1023 ≈ 12.1.
tc-mini    Transcoder world (`saelab.synthetic.transcoder`) on synth-mini's input side: d_out 256,
           64 fanout + 64 AND + 64 suppression outputs among 4,224 output features.
tc-16k     The same on synth-16k's input side: d_out 768, 256 of each kind among 16,896 outputs.
           Both: gains U[0.5, 2], fanout ratio 1.5, skip_scale 0.7, ‖b_out‖ 0.5, noise std 0.2,
           dense input noise std 1.0 (≈ 40% of x's variance on tc-mini; without it S is not
           identifiable, see `saelab.synthetic.transcoder`), computing outputs firing ≥ 1e-3 on a
           65,536-sample pilot, u_j orthogonalised as the inputs.
sbw-toy    The "Sparse but Wrong" toy model (Chanin et al., notebooks/main_toy_model_experiments):
           50 features in 100 dims, orthogonalised (1000 Adam steps, lr 0.01), p_i falling
           linearly 0.388 → 0.05, strong random correlations (seed 42), magnitude 1 ± 0.15, no
           hierarchy, no bias. True L0 ≈ 11 (Σ p_i = 10.95).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

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
from saelab.synthetic.transcoder import TranscoderWorldConfig

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
        firing_probability=LinearFiringProbabilityConfig(
            max_prob=0.345 * (num_features - 1) / num_features + 0.05, min_prob=0.05
        ),
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


def _transcoder_world(input_cfg: SyntheticModelConfig, d_out: int, per_kind: int) -> TranscoderWorldConfig:
    return TranscoderWorldConfig(
        input=input_cfg,
        d_out=d_out,
        num_fanout=per_kind,
        num_and=per_kind,
        num_suppression=per_kind,
        gain_min=0.5,
        gain_max=2.0,
        fanout_gain_ratio=1.5,
        skip_scale=0.7,
        bias_out=0.5,
        noise_std=0.2,
        input_noise_std=1.0,
        min_cofire_rate=1e-3,
        pilot_samples=65_536,
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        seed=42,
    )


def _tc_mini() -> TranscoderWorldConfig:
    return _transcoder_world(_synth_mini(), d_out=256, per_kind=64)


def _tc_16k() -> TranscoderWorldConfig:
    return _transcoder_world(_synth_16k(), d_out=768, per_kind=256)


# Transcoder worlds: (x, y) pairs; kept apart so `list_presets()` stays the SAE worlds.
_TRANSCODER_PRESETS: dict[str, Callable[[], TranscoderWorldConfig]] = {
    "tc-mini": _tc_mini,
    "tc-16k": _tc_16k,
}

PresetConfig = SyntheticModelConfig | TranscoderWorldConfig


def parse_overrides(items: list[str], name: str = "--set") -> dict[str, Any]:
    """KEY=VALUE strings to a dict; VALUE is read as JSON (numbers, true/false, null) or else kept as
    text. ConfigError names the malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(name, item, "must be KEY=VALUE, e.g. skip_scale=0")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def preset_with_overrides(name: str, overrides: dict[str, Any]) -> PresetConfig:
    """The named preset's config with top-level fields replaced (e.g. a tc-mini world with
    skip_scale=0); each value is checked by the config's own validation. ConfigError names an
    unknown or nested field."""
    cfg = get_preset(name)
    names = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError("--set", key, f"is not a field of {name}; valid fields are {sorted(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            raise ConfigError("--set", key, "is a nested config; only top-level scalar fields can be set")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(cfg, **changes) if changes else cfg


def list_presets() -> list[str]:
    """The SAE-world presets (synthetic activation models)."""
    return sorted(_PRESETS)


def list_transcoder_presets() -> list[str]:
    """The transcoder-world presets."""
    return sorted(_TRANSCODER_PRESETS)


def list_all_presets() -> list[str]:
    """Every preset name `get_preset`, `build_preset` and `load_source` accept."""
    return sorted({**_PRESETS, **_TRANSCODER_PRESETS})


def get_preset(name: str) -> PresetConfig:
    """A fresh config for the named preset (a TranscoderWorldConfig for tc-*); unknown names raise
    ConfigError listing the valid ones."""
    factory = _PRESETS.get(name) or _TRANSCODER_PRESETS.get(name)
    if factory is None:
        raise ConfigError("preset", name, f"unknown preset; valid presets are {', '.join(list_all_presets())}")
    return factory()
