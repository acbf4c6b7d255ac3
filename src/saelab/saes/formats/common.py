"""What every foreign-format reader shares: safe file readers, checked config fields and tensors, the SAE builder.

Every problem is a one-line FileFormatError that names the file and the field or tensor. Nothing here
runs code from a file: `.pt` files go through `torch.load(weights_only=True)` only, `.npz` files
through `numpy.load(allow_pickle=False)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError
from saelab.saes.base import SAE
from saelab.saes.registry import registered_sae_class


@dataclass
class PretrainedInfo:
    """Where an SAE came from: `format` (e.g. "gemma_scope"), the source's own type name (`variant`,
    e.g. "BatchTopKSAE") and the folder or file read. `notes` records conversions applied on the way
    (a folded normalisation factor, a scalar threshold spread over every latent)."""

    format: str
    variant: str
    path: Path
    notes: list[str] = field(default_factory=list)


def clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------- JSON configs
def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; FileFormatError naming the file if it is missing, not JSON or not an object."""
    if not path.is_file():
        raise FileFormatError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise FileFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} must hold a JSON object, not a JSON {type(data).__name__}")
    return data


_MISSING: Any = object()


class Fields:
    """Typed access to a JSON object's fields; errors name the file and the dotted field name."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is _MISSING:
            raise FileFormatError(f"{self.path}: required field {self._name(key)!r} is missing")
        return default

    def _bad(self, key: str, value: Any, wanted: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: field {self._name(key)!r} is {clip(repr(value), 60)}, expected {wanted}")

    def section(self, key: str) -> Fields:
        value = self._get(key, _MISSING)
        if not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object")
        return Fields(self.path, value, f"{self._name(key)}.")

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        value = self._get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():  # some writers store 16384 as 16384.0
            value, ok = int(value), True
        if not ok or value < minimum:
            raise self._bad(key, value, f"an integer ≥ {minimum}")
        return int(value)

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, value, "a finite number")
        if positive and value <= 0:
            raise self._bad(key, value, "a number > 0")
        return float(value)

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value


# ----------------------------------------------------------------------------------------- tensor files
class Tensors:
    """A file's named tensors with checks: each `take` names the file, the tensor and what was expected."""

    def __init__(self, path: Path, tensors: Mapping[str, Any], kind: str):
        self.path, self.kind = path, kind
        self.tensors = dict(tensors)
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _listing(self) -> str:
        names = self.names()
        shown = ", ".join(repr(n) for n in names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        return shown or "nothing"

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise FileFormatError(
                f"{self.path} has no tensor {name!r} (it holds {self._listing()}): not {self.kind}, or a damaged one"
            )
        value = self.tensors[name]
        if not isinstance(value, torch.Tensor):
            raise FileFormatError(f"{self.path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        self.used.add(name)
        return value

    def take(self, name: str, shape: tuple[int, ...], dims: str = "") -> torch.Tensor:
        """Tensor `name` as float32, checked: present, of `shape`, floating point, finite."""
        tensor = self.raw(name)
        if tuple(tensor.shape) != tuple(shape):
            why = f" for {dims}" if dims else ""
            raise FileFormatError(
                f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}{why}"
            )
        return self._as_float(name, tensor)

    def take_threshold(self, name: str, d_sae: int) -> torch.Tensor:
        """A per-latent threshold [L]; a scalar one (BatchTopK's global cut) is spread over every latent."""
        tensor = self.raw(name)
        if tensor.numel() == 1 and tensor.dim() <= 1:
            return self._as_float(name, tensor).reshape(()).expand(d_sae).clone()
        return self.take(name, (d_sae,), f"d_sae={d_sae}")

    def integer(self, name: str) -> int:
        """A scalar integer tensor (e.g. dictionary_learning's `k` buffer)."""
        tensor = self.raw(name)
        if tensor.numel() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise FileFormatError(
                f"{self.path}: tensor {name!r} must be one integer, got dtype {_dtype(tensor)} shape {tuple(tensor.shape)}"
            )
        return int(tensor.reshape(()).item())

    def ignore(self, *names: str) -> None:
        """Entries known to be irrelevant for inference (training buffers): not reported as unexpected."""
        self.used.update(n for n in names if n in self.tensors)

    def check_no_extra(self, expected: str) -> None:
        """Refuse tensors nobody read: they mean a variant this reader does not understand."""
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise FileFormatError(
                f"{self.path}: unexpected tensor(s) {', '.join(repr(e) for e in extra[:6])} "
                f"({expected}); this variant is not supported"
            )

    def _as_float(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.dtype.is_floating_point:
            raise FileFormatError(
                f"{self.path}: tensor {name!r} has dtype {_dtype(tensor)}; weights must be floating point"
            )
        converted = tensor.detach().to(torch.float32)
        if not bool(torch.isfinite(converted).all()):
            bad = int((~torch.isfinite(converted)).sum())
            raise FileFormatError(f"{self.path}: tensor {name!r} holds {bad} NaN or infinite value(s)")
        return converted


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def read_safetensors(path: Path, kind: str) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileFormatError(f"{path} is missing")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileFormatError(
            f"{path} cannot be read as safetensors (truncated or corrupt?): {_first_line(err)}"
        ) from None
    return Tensors(path, tensors, kind)


def read_npz(path: Path, kind: str) -> Tensors:
    """The arrays of a .npz file (never unpickled: object arrays are refused)."""
    import numpy as np

    if not path.is_file():
        raise FileFormatError(f"{path} is missing")
    tensors: dict[str, torch.Tensor] = {}
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FileFormatError(f"{path} is a single .npy array, not a .npz archive of named arrays")
        with data:
            for key in data.files:
                array = data[key]
                if array.dtype.kind not in "fiub":
                    raise FileFormatError(f"{path}: array {key!r} has dtype {array.dtype}; weights must be numbers")
                tensors[key] = torch.from_numpy(np.array(array))
    except FileFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise FileFormatError(
            f"{path} cannot be read as a .npz archive (truncated or corrupt?): {_first_line(err)}"
        ) from None
    return Tensors(path, tensors, kind)


def read_torch_state(path: Path, kind: str) -> Tensors:
    """A `.pt` state dict, read with `torch.load(weights_only=True)`: a pickle that would run code is refused."""
    import warnings

    if not path.is_file():
        raise FileFormatError(f"{path} is missing")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        what = "loading it would import and run code" if "global" in reason.lower() else "it is not plain tensors"
        raise FileFormatError(
            f"{path} was refused: {what} ({reason}); saelab reads .pt files only with torch.load(weights_only=True)"
        ) from None
    except Exception as err:  # truncated zip, wrong magic number, ...
        raise FileFormatError(
            f"{path} cannot be read as a torch file (truncated or corrupt?): {_first_line(err)}"
        ) from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise FileFormatError(f"{path}: state dict keys must be strings, found {clip(repr(bad[0]), 40)}")
    return Tensors(path, obj, kind)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return clip(text.splitlines()[0] if text else type(err).__name__, 200)


def _unpickling_reason(err: BaseException) -> str:
    """torch's refusal names the offending global on one of several lines; keep that line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line or "Unsupported operand" in line:
            return clip(line, 160)
    return clip(lines[-1] if lines else type(err).__name__, 160)


# ----------------------------------------------------------------------------------------- building
def build_sae(arch: str, fields: dict[str, Any], tensors: Mapping[str, torch.Tensor], device: str, source: Path) -> SAE:
    """A registered saelab SAE `arch` from config `fields` and tensors named as SAELens names them on disk.

    Shapes were checked against the source's own names by the reader; this checks them once more
    against the SAE (a reader bug must not load silently)."""
    try:
        cls = registered_sae_class(arch)
    except ConfigError:
        raise FileFormatError(
            f"{source}: loading it needs saelab's {arch!r} architecture, which is not available"
        ) from None
    cfg_dict = {"decoder_init_norm": None, "dtype": "float32", **fields, "device": device}
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    try:
        cfg = cls.config_class(**{k: v for k, v in cfg_dict.items() if k in names})
    except ConfigError as err:
        raise FileFormatError(f"{source}: {err}") from None
    sae = cls(cfg)
    state = sae.state_dict()
    for disk_name, value in tensors.items():
        attr = cls.saelens_names.get(disk_name)
        if attr is None or attr not in state:
            raise FileFormatError(f"{source}: saelab's {arch} SAE has no tensor {disk_name!r}")
        if tuple(state[attr].shape) != tuple(value.shape):
            raise FileFormatError(
                f"{source}: tensor {disk_name!r} has shape {tuple(value.shape)}, expected {tuple(state[attr].shape)}"
            )
        state[attr] = value.to(state[attr].dtype)
    sae.load_state_dict(state)
    return sae


def transcoders_supported() -> bool:
    """Whether saelab's SAE config has a transcoder's output width (`d_out`) and skip."""
    from saelab.saes.base import SAEConfig

    names = {f.name for f in dataclasses.fields(SAEConfig)}
    return {"d_out", "skip"} <= names


def output_width(tensors: Tensors, name: str, d_sae: int) -> int:
    """A transcoder's output width E, from its decoder [L, E]."""
    W_dec = tensors.raw(name)
    if W_dec.dim() != 2 or W_dec.shape[0] != d_sae:
        raise FileFormatError(
            f"{tensors.path}: tensor {name!r} has shape {tuple(W_dec.shape)}, expected [d_sae={d_sae}, output width]"
        )
    return int(W_dec.shape[1])


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
