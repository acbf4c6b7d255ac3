"""Saving and loading SAEs in SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`).

`sae_lens.SAE.load_from_disk(path)` loads what `save_sae` writes, and `load_sae` loads folders
written by SAELens's `save_model` / `save_inference_model`. Saved SAEs are inference SAEs: input
scaling and decoder norms folded in, BatchTopK-family SAEs converted to JumpReLU.

Transcoders are saved under SAELens's names with `d_out` and `W_skip` [d_out, d_in]: `transcoder`,
`skip_transcoder` (standard, ReLU), `jumprelu_transcoder`, `jumprelu_skip_transcoder` (JumpReLU with
its thresholds: also what BatchTopK, Matryoshka and the recipe become). A TopK transcoder has no
SAELens name: it is saved as `topk_transcoder` / `topk_skip_transcoder`, which only saelab loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab import __version__
from saelab.errors import ConfigError, FileFormatError
from saelab.io import atomic_path, write_json_atomic
from saelab.saes.base import SAE, SAEConfig
from saelab.saes.registry import (
    USER_CODE_HINT,
    check_sae_protocol,
    get_sae_class,
    import_sae_class,
    registered_sae_class,
)

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
    inference_cls = type(inference)
    if not inference_cls.__module__.startswith("saelab."):
        # A user's class: what `load_sae(..., trust_code=True)` / `--trust-code` would import.
        meta["saelab_class"] = vars(inference_cls).get("import_spec") or (
            f"{inference_cls.__module__}:{inference_cls.__qualname__}"
        )
    architecture = inference.saelens_architecture()
    transcoder: dict[str, Any] = {}
    if inference.cfg.d_out is not None:
        architecture = transcoder_architecture(architecture, inference.cfg.skip)
        transcoder = {"d_out": inference.cfg.d_out}
    cfg = {
        "d_in": inference.cfg.d_in,
        "d_sae": inference.cfg.d_sae,
        **transcoder,
        "dtype": inference.cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": inference.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        **inference.saelens_config(),
        "architecture": architecture,
    }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILENAME) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(path / CFG_FILENAME, cfg)  # written last: a folder with cfg.json is complete
    return path


def transcoder_architecture(arch: str, skip: bool) -> str:
    """The cfg.json name of a transcoder whose inference architecture is `arch`: SAELens's `transcoder` /
    `skip_transcoder` (ReLU, saelab's standard) and `jumprelu_transcoder` / `jumprelu_skip_transcoder`;
    any other X becomes `X_transcoder` / `X_skip_transcoder`, which saelab loads and SAELens does not know."""
    return f"{'' if arch == 'standard' else arch + '_'}{'skip_' if skip else ''}transcoder"


def parse_transcoder_architecture(name: str) -> tuple[str, bool] | None:
    """(inference architecture, skip) of a transcoder name (`transcoder_architecture`'s inverse); None otherwise."""
    if not name.endswith("transcoder"):
        return None
    stem = name.removesuffix("transcoder")  # "", "skip_", "jumprelu_", "jumprelu_skip_", ...
    if stem and not stem.endswith("_"):
        return None
    skip = stem == "skip_" or stem.endswith("_skip_")
    if skip:
        stem = stem.removesuffix("skip_")
    return (stem.removesuffix("_") or "standard"), skip


def load_sae(
    path: str | Path,
    device: str = "cpu",
    *,
    arch: str | type[SAE] | None = None,
    trust_code: bool = False,
) -> SAE:
    """Load an SAE folder written by saelab or SAELens.

    The class comes from the registry by the name cfg.json gives: a file never makes saelab import
    code. For a folder saved from your own class, say which code to run: `arch="module:Class"` (or
    "path/file.py:Class", or the class itself) loads the folder as that class, and `trust_code=True`
    imports the class the folder names (its "architecture" if written module:Class, else the
    `metadata.saelab_class` that `save_sae` recorded). Every problem with the files is a one-line
    FileFormatError naming the file and the field or tensor."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    if not path.is_dir():
        raise FileFormatError(f"SAE folder {path} does not exist")
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise FileFormatError(f"{p} is missing: not an SAE folder in SAELens format")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(cfg_dict, dict):
        raise FileFormatError(f"{cfg_path} must hold a JSON object of config fields, not a JSON {_json_kind(cfg_dict)}")
    name = cfg_dict.get("architecture")
    if not isinstance(name, str):
        raise FileFormatError(f"{cfg_path} has no 'architecture' field (a string naming the SAE architecture)")
    transcoder = None if _is_registered(name) else parse_transcoder_architecture(name)
    if transcoder is not None:  # a transcoder: its inference architecture with d_out (and a skip)
        if "d_out" not in cfg_dict:
            raise FileFormatError(f"{cfg_path}: a {_clip(name)} needs the field 'd_out' (the output width)")
        name, skip = transcoder
        cfg_dict = {**cfg_dict, "skip": skip}
    cls = _resolve_class(cfg_path, cfg_dict, name, arch, trust_code)
    cfg_dict = {**cfg_dict, "device": device}
    if cfg_dict.get("normalize_activations") not in (None, "none", "expected_average_only_in"):
        raise FileFormatError(
            f"{cfg_path}: normalize_activations={cfg_dict['normalize_activations']!r} is not supported"
        )
    cfg_dict.setdefault("decoder_init_norm", None)
    cfg = _build_config(cfg_path, cls, cfg_dict)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{weights_path} cannot be read (truncated or corrupt?): {err}") from None
    expected = _expected_shapes(cls, cfg)  # before allocating: a cfg.json's d_sae may be absurd
    loaded = {}
    for disk_name, attr in cls.saelens_names.items():
        if attr not in expected:
            continue
        shape, dtype = expected[attr]
        tensor = tensors.get(disk_name)
        if tensor is None:
            raise FileFormatError(f"{weights_path} lacks tensor {disk_name!r} needed by {_clip(name)}")
        if tuple(tensor.shape) != shape:
            raise FileFormatError(
                f"{weights_path}: tensor {disk_name!r} has shape {tuple(tensor.shape)}, expected {shape} "
                f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (f", d_out={cfg.d_out}" if cfg.d_out is not None else "")
            )
        if not tensor.dtype.is_floating_point:
            raise FileFormatError(
                f"{weights_path}: tensor {disk_name!r} has dtype {_dtype_name(tensor.dtype)}; "
                "SAE weights must be floating point"
            )
        converted = tensor.to(dtype)
        if not bool(torch.isfinite(converted).all()):
            bad = int((~torch.isfinite(converted)).sum())
            # Finite on disk but not in the SAE's dtype: say so, or the file looks fine to whoever checks it.
            how = "" if converted.dtype == tensor.dtype else f" as {_dtype_name(dtype)}"
            raise FileFormatError(f"{weights_path}: tensor {disk_name!r} holds {bad} NaN or infinite value(s){how}")
        loaded[attr] = converted
    sae = cls(cfg)
    state = sae.state_dict()
    state.update(loaded)
    sae.load_state_dict(state)
    return sae.to(torch.device(device))


def _is_registered(name: str) -> bool:
    try:
        registered_sae_class(name)
    except ConfigError:
        return False
    return True


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_class(
    cfg_path: Path, cfg_dict: dict[str, Any], name: str, arch: str | type[SAE] | None, trust_code: bool
) -> type[SAE]:
    """The class to build: the user's explicit choice, else the registered `name`, else (trusted) the named code."""
    if arch is not None:
        if isinstance(arch, type):
            check_sae_protocol(getattr(arch, "__qualname__", str(arch)), arch)
            return arch
        return get_sae_class(arch)  # the caller's own choice (e.g. --arch): may import it
    try:
        return registered_sae_class(name)
    except ConfigError:
        pass
    metadata = cfg_dict.get("metadata")
    recorded = metadata.get("saelab_class") if isinstance(metadata, dict) else None
    spec = name if ":" in name else recorded if isinstance(recorded, str) and ":" in recorded else None
    if not trust_code:
        saved_from = f" (saved from {_clip(spec)!r})" if spec and spec != name else ""
        raise FileFormatError(
            f"{cfg_path}: architecture {_clip(name)!r}{saved_from} is not a registered saelab architecture and "
            f"saelab does not import code named by a file; if you trust it, {USER_CODE_HINT}"
        )
    if spec is None:
        raise FileFormatError(
            f"{cfg_path}: architecture {_clip(name)!r} is not registered and the folder names no "
            "module:Class to import; pass --arch module:Class"
        )
    try:
        return import_sae_class(spec)
    except ConfigError as err:
        raise FileFormatError(f"{cfg_path}: {err}") from None


def _build_config(cfg_path: Path, cls: type[SAE], cfg_dict: dict[str, Any]) -> SAEConfig:
    """The SAE's config from cfg.json; a missing or mistyped field is one line naming the file and the field(s)."""
    config_class = cls.config_class
    fields = [f for f in dataclasses.fields(config_class) if f.init]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _require_fields(cfg_path, [name for name in required if name not in cfg_dict])
    for f in fields:
        if f.name in cfg_dict:
            _check_json_type(cfg_path, config_class, f.name, cfg_dict[f.name])
    try:
        return config_class.from_dict(cfg_dict)
    except TypeError as err:
        # A config class with its own __init__ or from_dict: "__init__() missing 1 required ... argument: 'd_sae'"
        text = str(err)
        if "missing" in text and "required" in text:
            _require_fields(cfg_path, re.findall(r"'(\w+)'", text.partition("argument")[2]) or ["?"])
        raise FileFormatError(f"{cfg_path}: invalid config: {text}") from None
    except (ConfigError, ValueError) as err:  # ConfigError names the field and value
        raise FileFormatError(f"{cfg_path}: invalid config: {err}") from None


def _require_fields(cfg_path: Path, missing: list[str]) -> None:
    if len(missing) == 1:
        raise FileFormatError(f"{cfg_path}: required field {missing[0]!r} is missing")
    if missing:
        raise FileFormatError(f"{cfg_path}: required fields {', '.join(map(repr, missing))} are missing")


_JSON_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_json_type(cfg_path: Path, config_class: type, field_name: str, value: Any) -> None:
    """Refuse e.g. "d_sae": "big" naming the field (instead of a comparison's TypeError deep in validate)."""
    try:
        hint = typing.get_type_hints(config_class)[field_name]
    except Exception:  # an annotation that cannot be resolved: validate() still runs
        return
    allowed = _allowed_types(hint)
    if allowed is None:
        return
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    # JSON writers may store an int as 3.0 (SAELens's k); validate() decides whether it may be one.
    ok = ok or (int in allowed and isinstance(value, float) and value.is_integer())
    if not ok:
        wanted = " or ".join(dict.fromkeys("null" if t is type(None) else t.__name__ for t in allowed))
        raise FileFormatError(
            f"{cfg_path}: field {field_name!r} is {_clip(repr(value), 60)} (a JSON "
            f"{_json_kind(value)}), expected {wanted}"
        )


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """JSON-side types a simple annotation accepts (int, float, bool, str, optionally None); None if not simple."""
    if hint in _JSON_TYPES:
        return _JSON_TYPES[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        allowed: tuple[type, ...] = ()
        for arg in args:
            if arg is type(None):
                allowed += (type(None),)
            elif arg in _JSON_TYPES:
                allowed += _JSON_TYPES[arg]
            else:
                return None
        return allowed
    return None


def _expected_shapes(cls: type[SAE], cfg: SAEConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every state entry, from an SAE built on the meta device (no memory)."""
    try:
        state = cls(dataclasses.replace(cfg, device="meta")).state_dict()
    except Exception:  # an architecture that cannot be built on meta: build it for real
        state = cls(cfg).state_dict()
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
