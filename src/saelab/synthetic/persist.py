"""Saving and loading synthetic models: saelab's folder format, and folders written by SAELens.

A saelab folder holds
  saelab_synthetic.json         format tag + version + the full config (written last)
  synthetic_model.safetensors   feature_vectors, bias, firing_probabilities, mean/std magnitudes,
                                and correlation_factor + correlation_diag (low rank) or
                                correlation_matrix (full)
  hierarchy.json                the forest (SAELens's layout), when there is one
  synthetic_model_config.json   SAELens's config layout, when the config is expressible there
so SAELens's `SyntheticModel.load_from_disk` can read a saelab folder too (it ignores the extra
tensors). A SAELens folder has only the last three files (SAELens writes the same tensor names
minus the magnitudes, which it regenerates from the config's seeds; so do we).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.errors import ConfigError, FileFormatError
from saelab.io import atomic_path, write_json_atomic
from saelab.synthetic.config import LowRankCorrelationConfig, SyntheticModelConfig
from saelab.synthetic.correlation import LowRankCorrelation
from saelab.synthetic.hierarchy import Hierarchy
from saelab.synthetic.model import SyntheticModel

SAELAB_CONFIG_FILENAME = "saelab_synthetic.json"
SAELENS_CONFIG_FILENAME = "synthetic_model_config.json"
WEIGHTS_FILENAME = "synthetic_model.safetensors"
HIERARCHY_FILENAME = "hierarchy.json"
FORMAT_NAME = "saelab.synthetic_model"
FORMAT_VERSION = 1


def save_synthetic_model(model: SyntheticModel, path: str | Path) -> Path:
    """Write `model` to the folder `path` (created if needed). Each file is written atomically.

    A TranscoderWorld is written in its own layout (`transcoder_persist`)."""
    from saelab.synthetic.transcoder import TranscoderWorld

    if isinstance(model, TranscoderWorld):
        from saelab.synthetic.transcoder_persist import save_transcoder_world

        return save_transcoder_world(model, path)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    # The saelab marker goes last; drop a stale one first so a crash mid-save is never mistaken
    # for a complete folder.
    (path / SAELAB_CONFIG_FILENAME).unlink(missing_ok=True)

    tensors: dict[str, torch.Tensor] = {
        "feature_vectors": model.feature_vectors_FD,
        "bias": model.bias_D,
        "firing_probabilities": model.firing_probabilities_F,
        "mean_firing_magnitudes": model.mean_magnitudes_F,
        "std_firing_magnitudes": model.std_magnitudes_F,
    }
    if model.low_rank is not None:
        tensors["correlation_factor"] = model.low_rank.factor_FR
        tensors["correlation_diag"] = model.low_rank.diag_F
    if model.correlation_matrix_FF is not None:
        tensors["correlation_matrix"] = model.correlation_matrix_FF
    with atomic_path(path / WEIGHTS_FILENAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    if model.hierarchy is not None:
        write_json_atomic(path / HIERARCHY_FILENAME, model.hierarchy.to_dict())
    else:
        (path / HIERARCHY_FILENAME).unlink(missing_ok=True)

    cfg_dict = model.cfg.to_dict()
    if model.cfg.saelens_compatible:
        write_json_atomic(path / SAELENS_CONFIG_FILENAME, cfg_dict)
    else:
        (path / SAELENS_CONFIG_FILENAME).unlink(missing_ok=True)
    write_json_atomic(
        path / SAELAB_CONFIG_FILENAME,
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": cfg_dict,
            "seed": model.seed,
            "sample_seed": model.sample_seed,
        },
    )
    return path


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{file}: not valid JSON ({err})") from None


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise FileFormatError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileFormatError(f"{file}: not a readable safetensors file ({err})") from None


def _tensor(weights: dict[str, torch.Tensor], name: str, shape: tuple[int, ...] | None, file: Path) -> torch.Tensor:
    if name not in weights:
        raise FileFormatError(f"{file}: missing tensor '{name}' (has {sorted(weights)})")
    t = weights[name]
    if not t.is_floating_point():
        raise FileFormatError(f"{file}: tensor '{name}' has dtype {t.dtype}, expected a float dtype")
    if shape is not None and tuple(t.shape) != shape:
        raise FileFormatError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise FileFormatError(f"{file}: tensor '{name}' contains NaN or infinite values")
    return t


def _parse_config(d: Any, file: Path) -> SyntheticModelConfig:
    try:
        return SyntheticModelConfig.from_dict(d)
    except ConfigError as err:
        raise FileFormatError(f"{file}: invalid config: {err}") from None
    except TypeError as err:
        raise FileFormatError(f"{file}: invalid config: {err}") from None


def load_synthetic_model(path: str | Path, device: str | torch.device = "cpu") -> SyntheticModel:
    """Load a folder written by saelab (`save_synthetic_model`) or by SAELens (`SyntheticModel.save`).

    Raises FileFormatError naming the file and the problem for missing, corrupt or
    inconsistent files.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(f"{path}: not a directory (expected a saved synthetic model folder)")
    saelab_file = path / SAELAB_CONFIG_FILENAME
    saelens_file = path / SAELENS_CONFIG_FILENAME
    from saelab.synthetic.transcoder_persist import WORLD_CONFIG_FILENAME

    if (path / WORLD_CONFIG_FILENAME).is_file():
        raise FileFormatError(
            f"{path}: a transcoder world, not a synthetic model; load it with "
            "saelab.synthetic.load_source or load_transcoder_world"
        )
    meta: dict[str, Any] = {}
    if saelab_file.exists():
        meta = _read_json(saelab_file)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FileFormatError(
                f"{saelab_file}: not a saelab synthetic model (format={meta.get('format') if isinstance(meta, dict) else None!r})"
            )
        if meta.get("version") != FORMAT_VERSION:
            raise FileFormatError(
                f"{saelab_file}: unsupported format version {meta.get('version')!r} (this saelab reads {FORMAT_VERSION})"
            )
        cfg = _parse_config(meta.get("config"), saelab_file)
    elif saelens_file.exists():
        cfg = _parse_config(_read_json(saelens_file), saelens_file)
    else:
        raise FileFormatError(
            f"{path}: no {SAELAB_CONFIG_FILENAME} (saelab) or {SAELENS_CONFIG_FILENAME} (SAELens) in this folder"
        )

    wfile = path / WEIGHTS_FILENAME
    weights = _read_weights(wfile)
    F, D = cfg.num_features, cfg.hidden_dim
    vectors = _tensor(weights, "feature_vectors", (F, D), wfile)
    bias = _tensor(weights, "bias", (D,), wfile)
    probs = _tensor(weights, "firing_probabilities", (F,), wfile)
    if (probs < 0).any() or (probs > 1).any():
        raise FileFormatError(f"{wfile}: tensor 'firing_probabilities' has values outside [0, 1]")
    mean = _tensor(weights, "mean_firing_magnitudes", (F,), wfile) if "mean_firing_magnitudes" in weights else None
    std = _tensor(weights, "std_firing_magnitudes", (F,), wfile) if "std_firing_magnitudes" in weights else None

    low_rank = None
    corr_matrix = None
    if "correlation_factor" in weights:
        factor = _tensor(weights, "correlation_factor", None, wfile)
        diag = _tensor(weights, "correlation_diag", (F,), wfile)
        if factor.ndim != 2 or factor.shape[0] != F:
            raise FileFormatError(
                f"{wfile}: tensor 'correlation_factor' has shape {tuple(factor.shape)}, expected ({F}, rank)"
            )
        if (diag <= 0).any():
            raise FileFormatError(f"{wfile}: tensor 'correlation_diag' must be > 0 everywhere")
        if isinstance(cfg.correlation, LowRankCorrelationConfig) and factor.shape[1] != cfg.correlation.rank:
            raise FileFormatError(
                f"{wfile}: tensor 'correlation_factor' has rank {factor.shape[1]} but the config says rank {cfg.correlation.rank}"
            )
        low_rank = LowRankCorrelation(factor.float(), diag.float())
    elif "correlation_matrix" in weights:
        corr_matrix = _tensor(weights, "correlation_matrix", (F, F), wfile).float()
    elif cfg.correlation is not None:
        # SAELens regenerates a missing correlation from the config's seed; so do we.
        low_rank, corr_matrix = SyntheticModel._build_correlation(cfg, _seed_or_fail(cfg, meta, wfile))

    hierarchy = None
    hfile = path / HIERARCHY_FILENAME
    if hfile.exists():
        try:
            hierarchy = Hierarchy.from_dict(_read_json(hfile), F)
        except ConfigError as err:
            raise FileFormatError(f"{hfile}: invalid hierarchy: {err}") from None
    elif cfg.hierarchy is not None:
        from saelab.synthetic.hierarchy import generate_hierarchy
        from saelab.synthetic.model import SEED_OFFSET_HIERARCHY

        hierarchy = generate_hierarchy(F, cfg.hierarchy, seed=_seed_or_fail(cfg, meta, hfile) + SEED_OFFSET_HIERARCHY)

    try:
        model = SyntheticModel.from_parts(
            cfg,
            feature_vectors_FD=vectors,
            bias_D=bias,
            firing_probabilities_F=probs.float(),
            hierarchy=hierarchy,
            low_rank=low_rank,
            correlation_matrix_FF=corr_matrix,
            mean_magnitudes_F=mean,
            std_magnitudes_F=std,
            device=device,
            sample_seed=meta.get("sample_seed"),
            seed=meta.get("seed"),
        )
    except ConfigError as err:
        raise FileFormatError(f"{path}: inconsistent model files: {err}") from None
    return model


def _seed_or_fail(cfg: SyntheticModelConfig, meta: dict[str, Any], file: Path) -> int:
    seed = meta.get("seed", cfg.seed)
    if seed is None:
        raise FileFormatError(f"{file}: missing, and the config has no seed to regenerate it from")
    return int(seed)
