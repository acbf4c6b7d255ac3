"""Activation files: one reader for every [N, d_in] file format, and a source over their rows.

.npy and .safetensors are memory-mapped (rows are read when a batch needs them); .pt/.pth files
are read whole with `torch.load(weights_only=True)`, so a pickle inside one never runs. Under
torch.distributed each rank reads its own slice of every global batch (rank r of w reads rows
[p + r·b, p + (r+1)·b) and all ranks advance p by w·b, so w ranks see exactly the rows one
process with batch w·b would).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError, require
from saelab.parallel import rank_and_world

ACTIVATION_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")


class RowSegment:
    """Rows [0, n) of one file, read lazily (memory-mapped)."""

    def __init__(self, path: Path, n: int, d_in: int, read: Any):
        self.path, self.n, self.d_in, self._read = path, n, d_in, read

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._read(start, stop)


def safetensors_segment(path: Path, key: str | None = None) -> RowSegment:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
    except Exception as err:  # truncated header, not a safetensors file
        raise FileFormatError(f"{path} cannot be read as safetensors: {err}") from None
    if key is None:
        if "activations" in keys:
            key = "activations"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise FileFormatError(f"{path} holds tensors {keys}; name one 'activations'")
    elif key not in keys:
        raise FileFormatError(f"{path} has no tensor '{key}' (it holds {keys})")
    sl = handle.get_slice(key)
    shape = sl.get_shape()
    if len(shape) != 2 or shape[0] < 1:
        raise FileFormatError(f"{path}: '{key}' must be a [N, d_in] tensor, got shape {shape}")
    if sl.get_dtype() not in ("F16", "BF16", "F32", "F64"):  # as for .npy and .pt files
        raise FileFormatError(f"{path}: activations must be floating point, got {sl.get_dtype()}")
    return RowSegment(path, int(shape[0]), int(shape[1]), lambda a, b: sl[a:b].float())


def npy_segment(path: Path) -> RowSegment:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise FileFormatError(f"{path} cannot be read as a .npy array: {err}") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.dtype.kind != "f":
        raise FileFormatError(f"{path} must hold a floating-point [N, d_in] array, got {arr.dtype} {arr.shape}")
    return RowSegment(
        path, int(arr.shape[0]), int(arr.shape[1]), lambda a, b: torch.from_numpy(np.array(arr[a:b], dtype=np.float32))
    )


def torch_file_segment(path: Path) -> RowSegment:
    """A .pt/.pth file holding one tensor, or a dict with one tensor or an 'activations' key."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle of code objects is refused here, before anything runs
        raise FileFormatError(
            f"{path} cannot be read as tensors (only plain tensors are loaded, never code): {str(err).splitlines()[0]}"
        ) from None
    if isinstance(obj, dict):
        if "activations" in obj:
            obj = obj["activations"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise FileFormatError(f"{path} holds several tensors ({', '.join(map(str, obj))}); name one 'activations'")
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or obj.shape[0] < 1:
        raise FileFormatError(f"{path} must hold one [N, d_in] tensor, got {tuple(getattr(obj, 'shape', ()))}")
    if not obj.dtype.is_floating_point:
        raise FileFormatError(f"{path}: activations must be floating point, got {obj.dtype}")
    rows_ND = obj
    return RowSegment(path, int(rows_ND.shape[0]), int(rows_ND.shape[1]), lambda a, b: rows_ND[a:b].float())


def file_segments(paths: Sequence[str | Path]) -> list[RowSegment]:
    """Segments for activation files a user already has ([N, d_in] each; see the module docstring)."""
    require(len(paths) > 0, "activations", list(paths), "name at least one .npy, .safetensors or .pt file")
    segments = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError("activations", str(p), "does not exist")
        if p.suffix.lower() == ".npy":
            segments.append(npy_segment(p))
        elif p.suffix.lower() == ".safetensors":
            segments.append(safetensors_segment(p))
        elif p.suffix.lower() in (".pt", ".pth"):
            segments.append(torch_file_segment(p))
        else:
            raise ConfigError(
                "activations", str(p), f"must be one of {', '.join(ACTIVATION_SUFFIXES)} (or a cache folder: --cache)"
            )
    widths = {s.d_in for s in segments}
    if len(widths) > 1:
        raise ConfigError(
            "activations", [str(s.path) for s in segments], f"files have different widths {sorted(widths)}"
        )
    return segments


class RowFileSource:
    """Rows [start, stop) of concatenated segments, in order, cycling; position = next global row."""

    def __init__(
        self,
        segments: list[RowSegment],
        start: int = 0,
        stop: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        require(len(segments) > 0, "activations", segments, "no activation files")
        self.segments = segments
        self.d_in = segments[0].d_in
        self.offsets = [0]
        for s in segments:
            self.offsets.append(self.offsets[-1] + s.n)
        total = self.offsets[-1]
        stop = total if stop is None else stop
        require(0 <= start < stop <= total, "rows", (start, stop), f"must be a non-empty range within {total} rows")
        self.start, self.stop = start, stop
        r, w = rank_and_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.position = 0  # rows consumed by all ranks together, from `start`
        self.read_seconds = 0.0

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def read_rows(self, a: int, b: int) -> torch.Tensor:
        """Global rows [a, b) (no wrapping)."""
        parts = []
        for i, seg in enumerate(self.segments):
            lo, hi = max(a, self.offsets[i]), min(b, self.offsets[i + 1])
            if lo < hi:
                parts.append(seg.read(lo - self.offsets[i], hi - self.offsets[i]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _range(self, first: int, count: int) -> torch.Tensor:
        n = self.n_rows
        parts = []
        while count > 0:
            a = first % n
            take = min(count, n - a)
            parts.append(self.read_rows(self.start + a, self.start + a + take))
            first += take
            count -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._range(self.position + self.rank * batch_size, batch_size)
        self.position += self.world_size * batch_size
        self.read_seconds += time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "rows": [self.start, self.stop], "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("rows", [self.start, self.stop])) != [self.start, self.stop]:
            raise ConfigError(
                "activations",
                f"rows {self.start}..{self.stop}",
                f"differ from the checkpoint's rows {state['rows']}: resume on the same data",
            )
        self.position = int(state["position"])


class PairedRowFileSource(RowFileSource):
    """Inputs and their targets (a paired cache: an MLP's input and output), read at the same rows.

    Implements the paired-source protocol: `next_pair` gives ([B, d_in], [B, d_out]) of the same
    positions; `next_batch` gives the inputs and moves both on."""

    def __init__(
        self,
        segments: list[RowSegment],
        target_segments: list[RowSegment],
        start: int = 0,
        stop: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(segments, start=start, stop=stop, rank=rank, world_size=world_size)
        counts = [s.n for s in segments], [t.n for t in target_segments]
        if counts[0] != counts[1]:
            bad = (
                next(i for i, (a, b) in enumerate(zip(*counts)) if a != b) if len(counts[0]) == len(counts[1]) else None
            )
            where = (
                f"{segments[bad].path}: {counts[0][bad]} inputs, {counts[1][bad]} targets" if bad is not None else ""
            )
            raise FileFormatError(
                f"inputs and targets are not row-aligned ({sum(counts[0])} input rows in {len(counts[0])} segments, "
                f"{sum(counts[1])} target rows in {len(counts[1])} segments{'; ' + where if where else ''})"
            )
        self.targets = RowFileSource(
            target_segments, start=start, stop=stop, rank=self.rank, world_size=self.world_size
        )
        self.d_out = self.targets.d_in

    def next_pair(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.targets.position = self.position
        y_BE = self.targets.next_batch(batch_size)
        x_BD = self.next_batch(batch_size)
        return x_BD, y_BE

    def read_target_rows(self, a: int, b: int) -> torch.Tensor:
        """Global target rows [a, b) (no wrapping)."""
        return self.targets.read_rows(a, b)
