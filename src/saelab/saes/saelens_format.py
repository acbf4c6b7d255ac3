"""Saving and loading SAEs in SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`).

`sae_lens.SAE.load_from_disk(path)` loads what `save_sae` writes, and `load_sae` loads folders
written by SAELens's `save_model` / `save_inference_model`. Saved SAEs are inference SAEs: input
scaling and decoder norms folded in, BatchTopK-family SAEs converted to JumpReLU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab import __version__
from saelab.errors import ConfigError, FileFormatError
from saelab.io import atomic_path, write_json_atomic
from saelab.saes.base import SAE, get_sae_class

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (converted to its inference form) to folder `path` in SAELens's format."""
    path = Path(path)
    inference = sae.to_inference()
    state = inference.state_dict()
    tensors = {}
    for disk_name, attr in inference.saelens_names.items():
        if attr in state:
            tensors[disk_name] = state[attr].detach().to("cpu").contiguous()
    meta = {
        "saelab_version": __version__,
        "training_architecture": sae.architecture,
        **(metadata or {}),
    }
    cfg = {
        "d_in": inference.cfg.d_in,
        "d_sae": inference.cfg.d_sae,
        "dtype": inference.cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": inference.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        **inference.saelens_config(),
        "architecture": inference.saelens_architecture(),
    }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILENAME) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(path / CFG_FILENAME, cfg)  # written last: a folder with cfg.json is complete
    return path


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE folder written by saelab or SAELens."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    if not path.is_dir():
        raise FileFormatError(f"SAE folder {path} does not exist")
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise FileFormatError(f"{p} is missing: not an SAE folder in SAELens format")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{cfg_path} is not valid JSON: {err}") from None
    arch = cfg_dict.get("architecture")
    if not isinstance(arch, str):
        raise FileFormatError(f"{cfg_path} has no 'architecture' field")
    try:
        cls = get_sae_class(arch)
    except ConfigError:
        raise FileFormatError(f"{cfg_path}: architecture {arch!r} is not supported by saelab") from None
    cfg_dict = {**cfg_dict, "device": device}
    if cfg_dict.get("normalize_activations") not in (None, "none", "expected_average_only_in"):
        raise FileFormatError(
            f"{cfg_path}: normalize_activations={cfg_dict['normalize_activations']!r} is not supported"
        )
    cfg_dict.setdefault("decoder_init_norm", None)
    try:
        cfg = cls.config_class.from_dict(cfg_dict)
    except (ConfigError, TypeError) as err:
        raise FileFormatError(f"{cfg_path}: invalid config: {err}") from None
    try:
        tensors = load_file(str(weights_path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{weights_path} cannot be read (truncated or corrupt?): {err}") from None
    sae = cls(cfg)
    state = sae.state_dict()
    for disk_name, attr in sae.saelens_names.items():
        if attr not in state:
            continue
        if disk_name not in tensors:
            raise FileFormatError(f"{weights_path} lacks tensor {disk_name!r} needed by {arch}")
        if tuple(tensors[disk_name].shape) != tuple(state[attr].shape):
            raise FileFormatError(
                f"{weights_path}: {disk_name} has shape {tuple(tensors[disk_name].shape)}, "
                f"expected {tuple(state[attr].shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
            )
        state[attr] = tensors[disk_name].to(state[attr].dtype)
    sae.load_state_dict(state)
    return sae.to(torch.device(device))
