"""Checkpoint files: tensors in safetensors, everything else in JSON. Reading one never runs code.

A checkpoint is a folder:

    checkpoint.json                  format, step, run config, and the state with tensors as references
    tensors-<sha256[:16]>.safetensors  every tensor (weights, Adam moments, counters, RNG states)

A save writes the tensors file under a new name, then replaces checkpoint.json (which names that
file and its SHA-256), then deletes tensors files no longer named. Both writes are atomic, so a
kill at any moment leaves the old checkpoint or the new one complete, never a mix.

The first checkpoints were one `torch.save` pickle (`checkpoint.pt`); unpickling can run any code
the file's author chose, so those are refused with an explanation, never opened.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from saelab.errors import FileFormatError, OutputError
from saelab.io import remove_stale_temp_files, write_bytes_atomic, write_text_atomic

FORMAT = "saelab-checkpoint-v2"
JSON_NAME = "checkpoint.json"
LEGACY_NAME = "checkpoint.pt"
TENSORS_FILE = re.compile(r"^tensors-[0-9a-f]{16}\.safetensors$")
# Markers in the JSON for what JSON cannot hold itself.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = (_TENSOR, _TUPLE, _ITEMS)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, or a bare pickle


def legacy_message(path: Path) -> str:
    return (
        f"{path} is an old checkpoint format (a pickle) and was not loaded because loading it could run "
        "code; retrain (start the run again without --resume), or resume it with the saelab version "
        "that wrote it if you trust the file"
    )


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of `obj`; every tensor goes into `tensors` (a CPU copy) and leaves a reference."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "#"
        # A copy: the live tensor keeps changing after a snapshot is taken; contiguous for safetensors.
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        # Non-string keys (torch.optim state is keyed by parameter index) keep their type.
        return {_ITEMS: [[encode(k, tensors, path), encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path or 'the top level'}")


def decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        key = obj[_TENSOR]
        if key not in tensors:
            raise FileFormatError(f"checkpoint {where}: tensor {key!r} is missing from its tensors file")
        return tensors[key]
    if _TUPLE in obj:
        return tuple(decode(v, tensors, where) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_hashable(decode(k, tensors, where)): decode(v, tensors, where) for k, v in obj[_ITEMS]}
    return {k: decode(v, tensors, where) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write(folder: str | Path, encoded: Any, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write a checkpoint (from `encode`) into `folder`, replacing the one there atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    if folder.is_file():  # e.g. an old checkpoint.pt given as the path
        raise OutputError(f"{folder} is a file; a checkpoint is a folder: give another path")
    data = save(tensors)  # atomic_path creates the folder, and names it in any disk error
    digest = hashlib.sha256(data).hexdigest()
    name = f"tensors-{digest[:16]}.safetensors"
    write_bytes_atomic(folder / name, data)
    doc = {"format": FORMAT, **header, "tensors_file": name, "tensors_sha256": digest, "state": encoded}
    write_text_atomic(folder / JSON_NAME, json.dumps(doc, separators=(",", ":")) + "\n")
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != name and TENSORS_FILE.match(old.name):
            old.unlink(missing_ok=True)


def read_header(folder: str | Path) -> dict[str, Any]:
    """checkpoint.json, checked for its format; tensors are not read."""
    folder = Path(folder)
    check_not_legacy(folder)
    path = folder / JSON_NAME
    if not folder.exists():
        raise FileFormatError(f"checkpoint {folder} does not exist")
    if not path.is_file():
        raise FileFormatError(f"{folder} is not a saelab checkpoint: it has no {JSON_NAME}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FileFormatError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise FileFormatError(f"{path} is not a saelab checkpoint (format {found!r}, expected {FORMAT!r})")
    for key in ("tensors_file", "tensors_sha256", "state"):
        if key not in doc:
            raise FileFormatError(f"checkpoint {path} is missing the key {key!r}")
    return doc


def read(folder: str | Path) -> dict[str, Any]:
    """The full checkpoint state (as the trainer built it), tensors on the CPU."""
    from safetensors.torch import load

    folder = Path(folder)
    doc = read_header(folder)
    name = doc["tensors_file"]
    if not isinstance(name, str) or not TENSORS_FILE.match(name):  # never a path elsewhere
        raise FileFormatError(f"checkpoint {folder / JSON_NAME}: tensors_file={name!r} is not a tensors file name")
    tensors_path = folder / name
    try:
        data = tensors_path.read_bytes()
    except OSError as err:
        raise FileFormatError(f"checkpoint {folder}: cannot read {name}: {err.strerror or err}") from None
    if hashlib.sha256(data).hexdigest() != doc["tensors_sha256"]:
        raise FileFormatError(f"checkpoint {tensors_path} is corrupt: its SHA-256 differs from the one in {JSON_NAME}")
    try:
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise FileFormatError(f"checkpoint {tensors_path} cannot be read: {str(err).splitlines()[0]}") from None
    state = decode(doc["state"], tensors, str(folder))
    if not isinstance(state, dict):
        raise FileFormatError(f"checkpoint {folder / JSON_NAME}: state is not an object")
    return state


def require_keys(d: Any, keys: tuple[str, ...], where: str, folder: Path) -> None:
    """One-line FileFormatError naming the first missing key."""
    if not isinstance(d, dict):
        raise FileFormatError(f"checkpoint {folder}: {where or 'state'} is not an object")
    for key in keys:
        if key not in d:
            raise FileFormatError(f"checkpoint {folder} is missing the key {where + '.' if where else ''}{key}")


def check_not_legacy(path: str | Path) -> None:
    """Refuse a pickle checkpoint (a file, not a folder) without opening it beyond its first bytes."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
            raise FileFormatError(legacy_message(path))
        raise FileFormatError(f"{path} is not a saelab checkpoint (a checkpoint is a folder holding {JSON_NAME})")


def clean(folder: str | Path) -> None:
    """Remove what a killed save left: temp files, and tensors files checkpoint.json does not name."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    remove_stale_temp_files(folder)
    try:
        keep = json.loads((folder / JSON_NAME).read_text()).get("tensors_file")
    except FileNotFoundError:
        keep = None  # killed before the first checkpoint.json: no tensors file is named
    except (OSError, ValueError, AttributeError):
        return  # an unreadable checkpoint.json: leave everything for the error that reading it gives
    for entry in folder.glob("tensors-*.safetensors"):
        if entry.name != keep and TENSORS_FILE.match(entry.name):
            entry.unlink(missing_ok=True)


def remove(folder: str | Path) -> None:
    """Delete a checkpoint folder's own files (and the folder once empty); nothing else in it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    remove_stale_temp_files(folder, before=float("inf"))
    for entry in folder.iterdir():
        if entry.name == JSON_NAME or TENSORS_FILE.match(entry.name):
            entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else lives there; leave it
