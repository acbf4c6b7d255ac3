"""An on-disk activation cache: safetensors shards plus a manifest, written atomically.

Layout of a cache folder:

    manifest.json              format, model, layer, hook module, d_in, dtype, context size,
                               dataset, and one entry per *complete* shard (file, rows, bytes)
    shard_00000.safetensors    one tensor "activations" [rows, d_in] (already shuffled)
    writer_state.pt            the writer's position, so an interrupted `saelab cache` continues

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
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.activations.sources import RowFileSource, RowSegment, safetensors_segment
from saelab.errors import ConfigError, FileFormatError, require
from saelab.io import atomic_path, write_json_atomic

CACHE_FORMAT = "saelab-activation-cache-v1"
IDENTITY_KEYS = ("model_fingerprint", "layer", "hook_module", "d_in")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _identity_text(m: dict[str, Any]) -> str:
    return f"model {m.get('model')!r} module {m.get('hook_module')!r} (layer {m.get('layer')}), d_in {m.get('d_in')}"


def check_identity(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """ConfigError unless every key of `expected` that the manifest records agrees."""
    for key in IDENTITY_KEYS:
        if key in expected and expected[key] is not None and manifest.get(key) != expected[key]:
            raise ConfigError("cache", where, f"was written from {_identity_text(manifest)}, but this run uses "
                              f"{_identity_text({**manifest, **{k: v for k, v in expected.items() if v is not None}})} "
                              f"({key} differs); use another cache folder")


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    cache_dir = Path(cache_dir)
    path = cache_dir / "manifest.json"
    if not path.is_file():
        raise ConfigError("cache", str(cache_dir), "is not an activation cache (no manifest.json); write one with `saelab cache`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise FileFormatError(f"{path} is not a saelab activation cache manifest (format {manifest.get('format')!r})")
    return manifest


def verify_shards(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Every shard the manifest lists exists with the recorded size (a cheap truncation check)."""
    good = []
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            raise FileFormatError(f"cache {cache_dir}: shard {shard['file']} is missing; intact shards: "
                                  f"{len(good)} of {len(manifest['shards'])}. Rerun `saelab cache` into a new folder, "
                                  f"or restore the file")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise FileFormatError(f"cache {cache_dir}: shard {shard['file']} is truncated or altered ({size} bytes, "
                                  f"the manifest records {shard['bytes']}); the other shards are untouched. Restore it "
                                  f"or write the cache again")
        good.append(shard["file"])


def open_cache(cache_dir: str | Path, expected: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[RowSegment]]:
    """(manifest, segments) of a cache, after the identity and truncation checks."""
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
            raise FileFormatError(f"cache {cache_dir}: shard {shard['file']} holds [{seg.n}, {seg.d_in}], "
                                  f"the manifest records [{shard['rows']}, {manifest['d_in']}]")
        segments.append(seg)
    return manifest, segments


def cache_source(cache_dir: str | Path, expected: dict[str, Any] | None = None, eval_rows: int = 0,
                 split: str = "train") -> RowFileSource:
    """Training rows (all but the last `eval_rows`) or the held-out tail (`split="eval"`)."""
    _, segments = open_cache(cache_dir, expected)
    total = sum(s.n for s in segments)
    eval_rows = min(eval_rows, total // 2)
    if split == "eval":
        return RowFileSource(segments, start=total - max(eval_rows, 1), rank=0, world_size=1)
    return RowFileSource(segments, start=0, stop=total - eval_rows)


def write_cache(source: Any, cache_dir: str | Path, tokens: int, identity: dict[str, Any],
                shard_tokens: int = 65536, dtype: str = "float32", extra: dict[str, Any] | None = None,
                on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write `tokens` rows from `source` (an LM source: already shuffled) into shards; resumable.

    `identity`: model, layer, hook_module, d_in (checked against an existing manifest). Returns the
    manifest plus timings (`write_seconds`, `produce_seconds`)."""
    require(isinstance(tokens, int) and tokens > 0, "tokens", tokens, "must be a positive integer")
    require(isinstance(shard_tokens, int) and shard_tokens > 0, "shard_tokens", shard_tokens, "must be a positive integer")
    require(dtype in DTYPES, "dtype", dtype, f"must be one of {sorted(DTYPES)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state_path = cache_dir / "writer_state.pt"
    if (cache_dir / "manifest.json").exists():
        manifest = read_manifest(cache_dir)
        check_identity(manifest, identity, str(cache_dir))
        if manifest["dtype"] != dtype:
            raise ConfigError("dtype", dtype, f"cache {cache_dir} is stored as {manifest['dtype']}")
        verify_shards(cache_dir, manifest)
        if state_path.exists() and manifest["shards"]:
            source.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))
    else:
        if any(cache_dir.glob("shard_*.safetensors")):
            raise ConfigError("cache", str(cache_dir), "holds shards but no manifest.json; use an empty folder")
        manifest = {"format": CACHE_FORMAT, **identity, "dtype": dtype, "shards": [], "total_rows": 0,
                    "complete": False, **(extra or {})}
        write_json_atomic(cache_dir / "manifest.json", manifest)
    from safetensors.torch import save_file

    produce = write = 0.0
    while manifest["total_rows"] < tokens:
        n = min(shard_tokens, tokens - manifest["total_rows"])
        t0 = time.perf_counter()
        acts_ND = source.next_batch(n).to(DTYPES[dtype]).contiguous()
        t1 = time.perf_counter()
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        with atomic_path(cache_dir / name) as tmp:
            save_file({"activations": acts_ND}, str(tmp))
        with atomic_path(state_path) as tmp:
            torch.save(source.state_dict(), tmp)
        manifest["shards"].append({"file": name, "rows": n, "bytes": (cache_dir / name).stat().st_size})
        manifest["total_rows"] += n
        manifest["complete"] = manifest["total_rows"] >= tokens
        write_json_atomic(cache_dir / "manifest.json", manifest)  # the shard counts only from here on
        write += time.perf_counter() - t1
        produce += t1 - t0
        if on_shard:
            on_shard(manifest["total_rows"], tokens)
    return {**manifest, "produce_seconds": produce, "write_seconds": write}
