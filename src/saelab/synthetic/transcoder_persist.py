"""Saving and loading transcoder worlds (safetensors + JSON; loading never runs code).

A world folder holds
  saelab_transcoder_world.json     format tag + version + the full config + seed (written last)
  transcoder_world.safetensors     u_out [F_out, d_out], skip [d_out, d_in], bias_out [d_out],
                                   gain_out [F_out] (float); kind_out, src_out, other_out [F_out] (int64)
  input/                           the input side, a synthetic-model folder (`save_synthetic_model`;
                                   it also holds the sampling seed)
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
from saelab.synthetic.persist import load_synthetic_model, save_synthetic_model
from saelab.synthetic.transcoder import TranscoderWorld, TranscoderWorldConfig

WORLD_CONFIG_FILENAME = "saelab_transcoder_world.json"
WORLD_WEIGHTS_FILENAME = "transcoder_world.safetensors"
INPUT_FOLDER = "input"
WORLD_FORMAT_NAME = "saelab.transcoder_world"
WORLD_FORMAT_VERSION = 1

_FLOAT_TENSORS = ("u_out", "skip", "bias_out", "gain_out")
_INT_TENSORS = ("kind_out", "src_out", "other_out")


def is_transcoder_world_folder(path: str | Path) -> bool:
    return (Path(path) / WORLD_CONFIG_FILENAME).is_file()


def save_transcoder_world(world: TranscoderWorld, path: str | Path) -> Path:
    """Write `world` to the folder `path` (created if needed); each file atomically, the marker last."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    (path / WORLD_CONFIG_FILENAME).unlink(missing_ok=True)  # a crash mid-save never looks complete
    save_synthetic_model(world.input_model, path / INPUT_FOLDER)
    tensors = {
        "u_out": world.u_out_FE,
        "skip": world.skip_ED,
        "bias_out": world.bias_out_E,
        "gain_out": world.gain_out_F,
        "kind_out": world.kind_out_F,
        "src_out": world.src_out_F,
        "other_out": world.other_out_F,
    }
    with atomic_path(path / WORLD_WEIGHTS_FILENAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_json_atomic(
        path / WORLD_CONFIG_FILENAME,
        {
            "format": WORLD_FORMAT_NAME,
            "version": WORLD_FORMAT_VERSION,
            "config": world.cfg.to_dict(),
            "seed": world.seed,
        },
    )
    return path


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != WORLD_FORMAT_NAME:
        raise FileFormatError(f"{file}: not a saelab transcoder world")
    if meta.get("version") != WORLD_FORMAT_VERSION:
        raise FileFormatError(
            f"{file}: unsupported format version {meta.get('version')!r} (this saelab reads {WORLD_FORMAT_VERSION})"
        )
    return meta


def load_transcoder_world(path: str | Path, device: str | torch.device = "cpu") -> TranscoderWorld:
    """Load a folder written by `save_transcoder_world`. FileFormatError names the file and problem."""
    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(f"{path}: not a directory (expected a saved transcoder world folder)")
    cfile = path / WORLD_CONFIG_FILENAME
    meta = _read_meta(cfile)
    try:
        cfg = TranscoderWorldConfig.from_dict(meta.get("config"))
    except (ConfigError, TypeError) as err:
        raise FileFormatError(f"{cfile}: invalid config: {err}") from None
    seed = meta.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise FileFormatError(f"{cfile}: 'seed' must be a non-negative integer, got {seed!r}")

    wfile = path / WORLD_WEIGHTS_FILENAME
    if not wfile.exists():
        raise FileFormatError(f"{wfile}: missing")
    try:
        weights = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileFormatError(f"{wfile}: not a readable safetensors file ({err})") from None
    for name in (*_FLOAT_TENSORS, *_INT_TENSORS):
        if name not in weights:
            raise FileFormatError(f"{wfile}: missing tensor '{name}' (has {sorted(weights)})")
    for name in _FLOAT_TENSORS:
        if not weights[name].is_floating_point():
            raise FileFormatError(f"{wfile}: tensor '{name}' has dtype {weights[name].dtype}, expected a float dtype")
    for name in _INT_TENSORS:
        if weights[name].dtype != torch.int64:
            raise FileFormatError(f"{wfile}: tensor '{name}' has dtype {weights[name].dtype}, expected int64")

    input_model = load_synthetic_model(path / INPUT_FOLDER, device=device)
    if input_model.cfg != cfg.input:
        raise FileFormatError(f"{path / INPUT_FOLDER}: its config differs from the input config in {cfile}")
    try:
        return TranscoderWorld.from_parts(
            cfg,
            input_model,
            u_out_FE=weights["u_out"],
            skip_ED=weights["skip"],
            bias_out_E=weights["bias_out"],
            kind_out_F=weights["kind_out"],
            src_out_F=weights["src_out"],
            other_out_F=weights["other_out"],
            gain_out_F=weights["gain_out"],
            seed=seed,
        )
    except ConfigError as err:
        raise FileFormatError(f"{wfile}: inconsistent world files: {err}") from None
