"""Ground-truth synthetic activations (SAELens / SynthSAEBench semantics, fast sparse sampling).

    from saelab.synthetic import build_preset
    model = build_preset("synth-mini")
    hidden_BD = model.sample(1024)
    hidden_BD, acts = model.sample_sparse(1024)          # acts: (batch, feature, value) triples
    hidden_BD, feature_acts_BF = model.sample_with_features(1024)

Transcoder worlds (x, y pairs with a known map between true features; `transcoder`):

    world = build_preset("tc-mini")                      # or load_source("tc-mini")
    x_BD, y_BE = world.sample(1024)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError
from saelab.synthetic.config import (
    ConstantFiringProbabilityConfig,
    ConstantMagnitudeConfig,
    CorrelationConfig,
    ExponentialMagnitudeConfig,
    FiringProbabilityConfig,
    FoldedNormalMagnitudeConfig,
    FullCorrelationConfig,
    HierarchyConfig,
    LinearFiringProbabilityConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    MagnitudeConfig,
    OrthogonalizationConfig,
    RandomCorrelationConfig,
    RandomFiringProbabilityConfig,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    generate_magnitudes,
)
from saelab.synthetic.correlation import (
    LowRankCorrelation,
    fix_correlation_matrix,
    generate_low_rank_correlation,
    generate_random_correlation_matrix,
    validate_correlation_matrix,
)
from saelab.synthetic.hierarchy import Hierarchy, HierarchyNode, generate_hierarchy
from saelab.synthetic.model import SyntheticModel
from saelab.synthetic.orthogonalize import orthogonality_grad, orthogonality_loss, orthogonalize
from saelab.synthetic.persist import FORMAT_VERSION, load_synthetic_model, save_synthetic_model
from saelab.synthetic.presets import (
    REFERENCE_STATS,
    get_preset,
    list_all_presets,
    list_presets,
    list_transcoder_presets,
)
from saelab.synthetic.sampling import SparseFeatureActs
from saelab.synthetic.stats import (
    describe_model,
    empirical_firing_rates,
    firing_rate_range,
    hierarchy_summary,
    l0_of_first,
    l0_stats,
    mean_max_abs_cos,
    superposition_stats,
    true_l0,
)
from saelab.synthetic.transcoder import (
    COMPUTING_KINDS,
    KIND_NAMES,
    TranscoderWorld,
    TranscoderWorldConfig,
)
from saelab.synthetic.transcoder_persist import (
    WORLD_FORMAT_VERSION,
    is_transcoder_world_folder,
    load_transcoder_world,
    save_transcoder_world,
)
from saelab.synthetic.transcoder_stats import describe_transcoder_world

CACHE_ENV_VAR = "SAELAB_SYNTH_CACHE"


def build_from_config(cfg: Any, device: str | torch.device = "cpu") -> Any:
    """A SyntheticModel from a SyntheticModelConfig, or a TranscoderWorld from a TranscoderWorldConfig."""
    if isinstance(cfg, TranscoderWorldConfig):
        return TranscoderWorld(cfg, device=device)
    return SyntheticModel(cfg, device=device)


def build_preset(name: str, device: str | torch.device = "cpu", cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Build the named preset (see `list_all_presets()`): a SyntheticModel, or a TranscoderWorld
    for the transcoder presets (`list_transcoder_presets()`).

    With a cache folder (argument, or the SAELAB_SYNTH_CACHE environment variable) a preset is
    built once, saved there, and loaded on later calls (synth-16k: ~40 s to build, <1 s to load).
    The cache key includes a hash of the full config, so changed presets are rebuilt.
    """
    cfg = get_preset(name)
    if isinstance(cfg, TranscoderWorldConfig):
        build: Any = TranscoderWorld
        save: Any = save_transcoder_world
        load: Any = load_transcoder_world
        version = f"tc{WORLD_FORMAT_VERSION}-{FORMAT_VERSION}"
    else:
        build, save, load, version = SyntheticModel, save_synthetic_model, load_synthetic_model, str(FORMAT_VERSION)
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR)
    if not root:
        return build(cfg, device=device)
    root = Path(root).expanduser()
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    path = root / f"{name}-{digest}-v{version}"
    if path.is_dir():
        try:
            model = load(path, device=device)
            if model.cfg == cfg:
                return model
        except FileFormatError:
            pass  # a damaged cache entry: rebuild it below
    model = build(cfg, device=device)
    # Save to a private folder, then rename it into place: readers never see a partial entry.
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    save(model, tmp)
    try:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:
        pass  # another process won the race; its entry is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def load_source(spec: str, device: str | torch.device = "cpu", cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """A preset name (built, or loaded from the preset cache) or a folder saved by saelab or SAELens.

    SyntheticModel for SAE worlds; TranscoderWorld for tc-* presets and saved transcoder worlds."""
    if spec in list_all_presets():
        return build_preset(spec, device=device, cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        if is_transcoder_world_folder(path):
            return load_transcoder_world(path, device=device)
        return load_synthetic_model(path, device=device)
    raise ConfigError(
        "source", spec, f"is neither a preset ({', '.join(list_all_presets())}) nor an existing model folder"
    )


__all__ = [
    "CACHE_ENV_VAR",
    "COMPUTING_KINDS",
    "ConstantFiringProbabilityConfig",
    "ConstantMagnitudeConfig",
    "CorrelationConfig",
    "ExponentialMagnitudeConfig",
    "FiringProbabilityConfig",
    "FoldedNormalMagnitudeConfig",
    "FullCorrelationConfig",
    "Hierarchy",
    "HierarchyConfig",
    "HierarchyNode",
    "KIND_NAMES",
    "LinearFiringProbabilityConfig",
    "LinearMagnitudeConfig",
    "LowRankCorrelation",
    "LowRankCorrelationConfig",
    "MagnitudeConfig",
    "OrthogonalizationConfig",
    "REFERENCE_STATS",
    "RandomCorrelationConfig",
    "RandomFiringProbabilityConfig",
    "SparseFeatureActs",
    "SyntheticModel",
    "SyntheticModelConfig",
    "TranscoderWorld",
    "TranscoderWorldConfig",
    "ZipfianFiringProbabilityConfig",
    "build_preset",
    "describe_model",
    "describe_transcoder_world",
    "empirical_firing_rates",
    "firing_rate_range",
    "fix_correlation_matrix",
    "generate_hierarchy",
    "generate_low_rank_correlation",
    "generate_magnitudes",
    "generate_random_correlation_matrix",
    "get_preset",
    "hierarchy_summary",
    "is_transcoder_world_folder",
    "l0_of_first",
    "l0_stats",
    "list_all_presets",
    "list_presets",
    "list_transcoder_presets",
    "load_source",
    "load_synthetic_model",
    "load_transcoder_world",
    "mean_max_abs_cos",
    "orthogonality_grad",
    "orthogonality_loss",
    "orthogonalize",
    "save_synthetic_model",
    "build_from_config",
    "save_transcoder_world",
    "superposition_stats",
    "true_l0",
    "validate_correlation_matrix",
]
