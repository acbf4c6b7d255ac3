"""An on-disk activation cache: safetensors shards plus a manifest, written atomically.

Layout of a cache folder:

    manifest.json              format, model, layer, hook module, d_in, dtype, context size,
                               dataset, and one entry per *complete* shard (file, rows, bytes);
                               a paired cache also out_hook_module and d_out
    shard_00000.safetensors    one tensor "activations" [rows, d_in] (already shuffled); in a
                               paired cache (`saelab cache --out-hook-module`, for transcoders)
                               also "targets" [rows, d_out]: row i of both is the same token
    writer_state.safetensors   the writer's position (tensors, plus a JSON skeleton in the header), so an
                               interrupted `saelab cache` continues. Never a pickle: loading runs no code

Each shard and the manifest are written to a temporary file and renamed, and a shard enters the
manifest only after it is on disk, so a killed writer never leaves a half shard in the cache and
rerunning the same command continues after the last complete shard. Readers check every shard's
size against the manifest before training starts (a truncated or missing shard is an error that
names it; nothing is deleted) and check the model, layer and width against what a run expects.
Shards are memory-mapped: training reads only the rows of the current batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saelab.activations.files import PairedRowFileSource, RowFileSource, RowSegment, safetensors_segment
from saelab.dtypes import dtype_from_name
from saelab.errors import ConfigError, FileFormatError, require
from saelab.io import atomic_path, write_json_atomic

CACHE_FORMAT = "saelab-activation-cache-v1"
STATE_FILE = "writer_state.safetensors"
STATE_FORMAT = "saelab-cache-writer-state-v1"
OLD_STATE_FILE = "writer_state.pt"  # the pickle format of earlier versions: refused, never loaded
_TENSOR_KEY = "__tensor__"
IDENTITY_KEYS = ("model_fingerprint", "layer", "hook_module", "d_in", "out_hook_module", "d_out")
TARGET_KEY = "targets"  # a paired cache's target tensor in each shard, beside "activations"
STORED_DTYPES = ("float32", "bfloat16", "float16")


def _identity_text(m: dict[str, Any]) -> str:
    text = f"model {m.get('model')!r} module {m.get('hook_module')!r} (layer {m.get('layer')}), d_in {m.get('d_in')}"
    if m.get("out_hook_module") is not None:
        text += f", output module {m['out_hook_module']!r}, d_out {m.get('d_out')}"
    return text


def is_paired_manifest(manifest: dict[str, Any]) -> bool:
    """Whether a cache holds (input, target) pairs: written with an output hook, for transcoders."""
    return manifest.get("d_out") is not None


def check_identity(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """ConfigError unless every key of `expected` that the manifest records agrees."""
    for key in IDENTITY_KEYS:
        if key in expected and expected[key] is not None and manifest.get(key) != expected[key]:
            raise ConfigError(
                "cache",
                where,
                f"was written from {_identity_text(manifest)}, but this run uses "
                f"{_identity_text({**manifest, **{k: v for k, v in expected.items() if v is not None}})} "
                f"({key} differs); use another cache folder",
            )


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    cache_dir = Path(cache_dir)
    path = cache_dir / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            "cache", str(cache_dir), "is not an activation cache (no manifest.json); write one with `saelab cache`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise FileFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise FileFormatError(f"{path} is not a saelab activation cache manifest (format {found!r})")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """The fields readers and the writer use, with their types: a hand-edited manifest fails here, by name."""

    def bad(field: str, why: str) -> FileFormatError:
        return FileFormatError(f"{path}: {field}={m.get(field)!r} {why}")

    for field in ("d_in", "total_rows"):
        if not isinstance(m.get(field), int) or isinstance(m.get(field), bool) or m[field] < 0:
            raise bad(field, "must be a non-negative integer")
    if m.get("d_out") is not None or m.get("out_hook_module") is not None:  # a paired cache: both, or neither
        if not isinstance(m.get("d_out"), int) or isinstance(m.get("d_out"), bool) or m["d_out"] <= 0:
            raise bad("d_out", "must be a positive integer in a paired cache (one with out_hook_module)")
        if not isinstance(m.get("out_hook_module"), str):
            raise bad("out_hook_module", "must name the output hook in a paired cache (one with d_out)")
    if m.get("dtype") not in STORED_DTYPES:
        raise bad("dtype", f"must be one of {', '.join(STORED_DTYPES)}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", "must be a list")
    for i, shard in enumerate(shards):
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and shard["file"] == Path(shard["file"]).name
            and shard["file"].endswith(".safetensors")
            and all(
                isinstance(shard.get(k), int) and not isinstance(shard.get(k), bool) and shard[k] >= 0
                for k in ("rows", "bytes")
            )
        )
        if not ok:  # a file name with folders in it could point outside the cache
            raise FileFormatError(
                f"{path}: shards[{i}]={shard!r} must be {{file: NAME.safetensors, rows: N, bytes: N}}"
            )
    if sum(shard["rows"] for shard in shards) != m["total_rows"]:
        raise bad("total_rows", f"differs from the sum of the shards' rows ({sum(s['rows'] for s in shards)})")


def verify_shards(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Every shard the manifest lists exists with the recorded size (a cheap truncation check)."""
    good = []
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise FileFormatError(
                f"cache {cache_dir}: shard {shard['file']} is missing; intact shards: "
                f"{len(good)} of {len(manifest['shards'])}. Rerun `saelab cache` into a new folder, "
                f"or restore the file"
            )
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise FileFormatError(
                f"cache {cache_dir}: shard {shard['file']} is truncated or altered ({size} bytes, "
                f"the manifest records {shard['bytes']}); the other shards are untouched. Restore it "
                f"or write the cache again"
            )
        good.append(shard["file"])


def open_cache(
    cache_dir: str | Path, expected: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[RowSegment]]:
    """(manifest, segments) of a cache, after the identity and truncation checks."""
    manifest, segments, _ = open_cache_pairs(cache_dir, expected)
    return manifest, segments


def open_cache_pairs(
    cache_dir: str | Path, expected: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[RowSegment], list[RowSegment] | None]:
    """(manifest, input segments, target segments or None) of a cache, after the identity,
    truncation and alignment checks: a paired shard's targets have as many rows as its inputs."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if expected:
        check_identity(manifest, expected, str(cache_dir))
    if not manifest["shards"]:
        raise ConfigError("cache", str(cache_dir), "holds no complete shards yet")
    verify_shards(cache_dir, manifest)
    segments = []
    for shard in manifest["shards"]:
        seg = safetensors_segment(cache_dir / shard["file"], key="activations")
        if seg.d_in != manifest["d_in"] or seg.n != shard["rows"]:
            raise FileFormatError(
                f"cache {cache_dir}: shard {shard['file']} holds [{seg.n}, {seg.d_in}], "
                f"the manifest records [{shard['rows']}, {manifest['d_in']}]"
            )
        segments.append(seg)
    if not is_paired_manifest(manifest):
        return manifest, segments, None
    targets = []
    for shard, seg in zip(manifest["shards"], segments):
        target = safetensors_segment(cache_dir / shard["file"], key=TARGET_KEY)
        if target.n != seg.n or target.d_in != manifest["d_out"]:
            raise FileFormatError(
                f"cache {cache_dir}: shard {shard['file']} holds inputs [{seg.n}, {seg.d_in}] but targets "
                f"[{target.n}, {target.d_in}]; a paired shard needs [rows, d_in] and [rows, d_out={manifest['d_out']}] "
                f"with the same rows. Write the cache again"
            )
        targets.append(target)
    return manifest, segments, targets


def cache_source(
    cache_dir: str | Path, expected: dict[str, Any] | None = None, eval_rows: int = 0, split: str = "train"
) -> RowFileSource:
    """Training rows (all but the last `eval_rows`) or the held-out tail (`split="eval"`); a paired
    cache gives a `PairedRowFileSource` (inputs and targets at the same rows)."""
    _, segments, targets = open_cache_pairs(cache_dir, expected)
    total = sum(s.n for s in segments)
    eval_rows = min(eval_rows, total // 2)
    start, stop = (total - max(eval_rows, 1), total) if split == "eval" else (0, total - eval_rows)
    rank_world: dict[str, Any] = {"rank": 0, "world_size": 1} if split == "eval" else {}
    if targets is not None:
        return PairedRowFileSource(segments, targets, start=start, stop=stop, **rank_world)
    return RowFileSource(segments, start=start, stop=stop, **rank_world)


# ----------------------------------------------------------------------------------------- writer state
def _skeleton(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `obj` with each tensor moved into `tensors` and replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared ones
        return {_TENSOR_KEY: key}
    if isinstance(obj, dict):
        if _TENSOR_KEY in obj or not all(isinstance(k, str) for k in obj):
            raise TypeError(f"writer state dict keys must be strings other than {_TENSOR_KEY!r}: {list(obj)}")
        return {k: _skeleton(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_skeleton(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a writer state cannot hold {type(obj).__name__} values")


def _rebuild(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_KEY}:
            if obj[_TENSOR_KEY] not in tensors:
                raise FileFormatError(f"{path} is corrupt: it refers to a tensor {obj[_TENSOR_KEY]!r} it does not hold")
            return tensors[obj[_TENSOR_KEY]]
        return {k: _rebuild(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, tensors, path) for v in obj]
    return obj


def save_writer_state(path: str | Path, state: dict[str, Any], rows: int) -> None:
    """Write a source's state_dict (nested dicts/lists of tensors and plain values) as safetensors,
    atomically; `rows` is the number of cache rows written when the state was taken."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _skeleton(state, tensors)
    with atomic_path(path) as tmp:
        save_file(
            tensors, str(tmp), metadata={"format": STATE_FORMAT, "rows": str(rows), "state": json.dumps(skeleton)}
        )


def load_writer_state(path: str | Path) -> tuple[dict[str, Any], int]:
    """(state, rows) saved by `save_writer_state`. Only tensors and JSON are read: nothing runs."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(
            f"{path} is not a readable writer state ({err}); write the cache into a new folder"
        ) from None
    if meta.get("format") != STATE_FORMAT:
        raise FileFormatError(f"{path} is not a saelab cache writer state (format {meta.get('format')!r})")
    try:
        skeleton, rows = json.loads(meta["state"]), int(meta["rows"])
    except (KeyError, ValueError, RecursionError) as err:
        raise FileFormatError(f"{path} is corrupt: its header does not hold the state ({err})") from None
    state = _rebuild(skeleton, tensors, path)
    if not isinstance(state, dict):
        raise FileFormatError(f"{path} is corrupt: the state is not an object")
    return state, rows


def _resume_state(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The writer state to continue from, after reconciling it with the manifest; None for a fresh start.

    Each shard is written, then the state, then the manifest: a writer killed between the last two
    leaves a complete shard the manifest does not list yet, which is adopted here (its rows were
    consumed by the saved state, so writing them again would skip data)."""
    state_path = cache_dir / STATE_FILE
    if not state_path.exists():
        if (cache_dir / OLD_STATE_FILE).exists():
            raise FileFormatError(
                f"{cache_dir / OLD_STATE_FILE} is a writer state in the old pickle format, which saelab no longer "
                f"loads (unpickling can run code); the {len(manifest['shards'])} shard(s) listed in manifest.json "
                f"are usable as they are; to write more rows, write the cache into a new folder"
            )
        if manifest["shards"]:
            raise FileFormatError(
                f"{cache_dir} holds {len(manifest['shards'])} shard(s) but no {STATE_FILE}, so "
                f"the writer cannot continue where it stopped; write the cache into a new folder"
            )
        return None
    state, rows = load_writer_state(state_path)
    if rows != manifest["total_rows"]:
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        extra = rows - manifest["total_rows"]
        shard = cache_dir / name
        seg = safetensors_segment(shard, key="activations") if extra > 0 and shard.is_file() else None
        if seg is not None and is_paired_manifest(manifest):
            target = safetensors_segment(shard, key=TARGET_KEY)
            seg = seg if (target.n, target.d_in) == (extra, manifest["d_out"]) else None
        if seg is None or seg.n != extra or seg.d_in != manifest["d_in"]:
            raise FileFormatError(
                f"{state_path} is at row {rows} but manifest.json records {manifest['total_rows']} "
                f"rows; write the cache into a new folder"
            )
        manifest["shards"].append({"file": name, "rows": extra, "bytes": shard.stat().st_size})
        manifest["total_rows"] = rows
        write_json_atomic(cache_dir / "manifest.json", manifest)
    return state


def write_cache(
    source: Any,
    cache_dir: str | Path,
    tokens: int,
    identity: dict[str, Any],
    shard_tokens: int = 65536,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write `tokens` rows from `source` (an LM source: already shuffled) into shards; resumable.

    `identity`: model, layer, hook_module, d_in (checked against an existing manifest); with
    out_hook_module and d_out the source must be paired (`d_out`, `next_pair`) and each shard holds
    its inputs and targets. Returns the manifest plus timings (`write_seconds`, `produce_seconds`)."""
    require(isinstance(tokens, int) and tokens > 0, "tokens", tokens, "must be a positive integer")
    require(
        isinstance(shard_tokens, int) and shard_tokens > 0, "shard_tokens", shard_tokens, "must be a positive integer"
    )
    stored_dtype = dtype_from_name(dtype, "dtype", allowed=STORED_DTYPES)
    paired = identity.get("d_out") is not None
    if paired and (getattr(source, "d_out", None) != identity["d_out"] or not hasattr(source, "next_pair")):
        raise ConfigError(
            "d_out",
            identity["d_out"],
            f"a paired cache needs a paired source of that target width, got {type(source).__name__}",
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state_path = cache_dir / STATE_FILE
    if (cache_dir / "manifest.json").exists():
        manifest = read_manifest(cache_dir)
        check_identity(manifest, identity, str(cache_dir))
        if is_paired_manifest(manifest) and not paired:
            raise ConfigError(
                "cache",
                str(cache_dir),
                f"holds paired rows (output module {manifest['out_hook_module']!r}); continue it with the same "
                f"--out-hook-module, or use another cache folder",
            )
        if manifest["dtype"] != dtype:
            raise ConfigError("dtype", dtype, f"cache {cache_dir} is stored as {manifest['dtype']}")
        verify_shards(cache_dir, manifest)
        if manifest["total_rows"] < tokens:  # only continuing needs the saved position
            state = _resume_state(cache_dir, manifest)
            if state is not None:
                try:
                    source.load_state_dict(state)
                except (KeyError, TypeError, IndexError) as err:
                    raise FileFormatError(
                        f"{state_path} does not fit this source ({type(err).__name__}: {err}); "
                        f"write the cache into a new folder"
                    ) from None
    else:
        if any(cache_dir.glob("shard_*.safetensors")):
            raise ConfigError("cache", str(cache_dir), "holds shards but no manifest.json; use an empty folder")
        manifest = {
            "format": CACHE_FORMAT,
            **identity,
            "dtype": dtype,
            "shards": [],
            "total_rows": 0,
            "complete": False,
            **(extra or {}),
        }
        write_json_atomic(cache_dir / "manifest.json", manifest)
    from safetensors.torch import save_file

    produce = write = 0.0
    while manifest["total_rows"] < tokens:
        n = min(shard_tokens, tokens - manifest["total_rows"])
        t0 = time.perf_counter()
        if paired:  # one file per shard: its inputs and targets appear (and vanish) together
            x_ND, y_NE = source.next_pair(n)
            tensors = {"activations": x_ND, TARGET_KEY: y_NE}
        else:
            tensors = {"activations": source.next_batch(n)}
        tensors = {k: v.to(stored_dtype).contiguous() for k, v in tensors.items()}
        t1 = time.perf_counter()
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        with atomic_path(cache_dir / name) as tmp:
            save_file(tensors, str(tmp))
        save_writer_state(state_path, source.state_dict(), manifest["total_rows"] + n)
        manifest["shards"].append({"file": name, "rows": n, "bytes": (cache_dir / name).stat().st_size})
        manifest["total_rows"] += n
        manifest["complete"] = manifest["total_rows"] >= tokens
        write_json_atomic(cache_dir / "manifest.json", manifest)  # the shard counts only from here on
        write += time.perf_counter() - t1
        produce += t1 - t0
        if on_shard:
            on_shard(manifest["total_rows"], tokens)
    return {**manifest, "produce_seconds": produce, "write_seconds": write}
