"""Activation cache: round trip, resumable reading and writing, truncated shards, identity checks;
the shuffling buffer and the background prefetcher."""

import json

import numpy as np
import pytest
import torch

from saelab.activations.buffer import PrefetchSource, ShuffleBuffer
from saelab.activations.cache import cache_source, open_cache, write_cache
from saelab.activations.files import RowFileSource, file_segments
from saelab.data import TensorSource
from saelab.errors import ConfigError, FileFormatError

IDENTITY = {"model": "/models/a", "model_fingerprint": "abc", "layer": 3, "hook_module": "h.3", "d_in": 8}


def rows(n=1000, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_round_trip_and_resume_position(tmp_path):
    data_ND = rows()
    manifest = write_cache(TensorSource(data_ND), tmp_path / "c", tokens=1000, identity=IDENTITY, shard_tokens=300)
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100] and manifest["complete"]
    src = cache_source(tmp_path / "c", IDENTITY)
    assert torch.equal(src.next_batch(450), data_ND[:450])  # crosses a shard boundary
    state = src.state_dict()
    nxt = src.next_batch(700)  # wraps around the end
    assert torch.equal(nxt, torch.cat([data_ND[450:], data_ND[:150]]))
    fresh = cache_source(tmp_path / "c", IDENTITY)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch(700), nxt)


def test_writer_continues_after_interruption(tmp_path):
    data_ND = rows()
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)
    # A later run of the same command with a larger target continues from the saved position.
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=1000, identity=IDENTITY, shard_tokens=300)
    _, segments = open_cache(tmp_path / "c")
    got = torch.cat([s.read(0, s.n) for s in segments])
    assert torch.equal(got, data_ND)


def test_bfloat16_storage(tmp_path):
    data_ND = rows(100)
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=100, identity=IDENTITY, shard_tokens=64, dtype="bfloat16")
    got = cache_source(tmp_path / "c").next_batch(100)
    assert got.dtype == torch.float32 and torch.equal(got, data_ND.bfloat16().float())


def test_truncated_shard_is_reported_and_nothing_deleted(tmp_path):
    write_cache(TensorSource(rows()), tmp_path / "c", tokens=1000, identity=IDENTITY, shard_tokens=300)
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(FileFormatError, match="shard_00001.safetensors is truncated"):
        cache_source(tmp_path / "c", IDENTITY)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    shard.unlink()
    with pytest.raises(FileFormatError, match="shard_00001.safetensors is missing"):
        cache_source(tmp_path / "c")


def test_cache_from_another_model_or_width(tmp_path):
    write_cache(TensorSource(rows()), tmp_path / "c", tokens=300, identity=IDENTITY, shard_tokens=300)
    with pytest.raises(ConfigError) as err:
        cache_source(tmp_path / "c", {**IDENTITY, "d_in": 16})
    assert err.value.field == "cache" and "d_in differs" in str(err.value)
    with pytest.raises(ConfigError, match="model_fingerprint differs"):
        cache_source(tmp_path / "c", {**IDENTITY, "model_fingerprint": "other"})
    # Appending from another model is refused before anything is written.
    with pytest.raises(ConfigError, match="layer differs"):
        write_cache(TensorSource(rows()), tmp_path / "c", tokens=600, identity={**IDENTITY, "layer": 4})
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["total_rows"] == 300
    with pytest.raises(ConfigError, match="not an activation cache"):
        cache_source(tmp_path)


def test_user_files_npy_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    a_ND, b_ND = rows(50, 4, 1), rows(30, 4, 2)
    np.save(tmp_path / "a.npy", a_ND.numpy())
    save_file({"activations": b_ND}, str(tmp_path / "b.safetensors"))
    src = RowFileSource(file_segments([tmp_path / "a.npy", tmp_path / "b.safetensors"]))
    assert torch.equal(src.next_batch(80), torch.cat([a_ND, b_ND]))
    np.save(tmp_path / "c.npy", rows(5, 3).numpy())
    with pytest.raises(ConfigError, match="different widths"):
        file_segments([tmp_path / "a.npy", tmp_path / "c.npy"])


def test_ranks_read_disjoint_halves_of_each_global_batch(tmp_path):
    np.save(tmp_path / "a.npy", rows(64, 4).numpy())
    segs = file_segments([tmp_path / "a.npy"])
    single = RowFileSource(segs, rank=0, world_size=1)
    r0, r1 = RowFileSource(segs, rank=0, world_size=2), RowFileSource(segs, rank=1, world_size=2)
    for _ in range(3):
        assert torch.equal(single.next_batch(16), torch.cat([r0.next_batch(8), r1.next_batch(8)]))


def test_shuffle_buffer_mixes_contexts_and_loses_nothing():
    # Each fill is one "context": 32 rows whose first column is the context id.
    counter = iter(range(10_000))

    def fill():
        c = next(counter)
        out = torch.zeros(32, 2)
        out[:, 0] = c
        out[:, 1] = torch.arange(32)
        return out

    buf = ShuffleBuffer(fill, 2, capacity=512, seed=0)
    batch = buf.take(64)
    assert len(set(batch[:, 0].tolist())) >= 10  # rows from many contexts, not one or two
    taken = torch.cat([batch, buf.take(64 * 30)])
    pairs = {(int(a), int(b)) for a, b in taken.tolist()}
    assert len(pairs) == taken.shape[0]  # no row handed out twice


def test_shuffle_buffer_and_prefetch_resume_exactly():
    src = TensorSource(rows(5000, 4))

    def fill():
        return src.next_batch(100)

    buf = ShuffleBuffer(fill, 4, capacity=600, seed=1)
    buf.take(250)
    state, src_state = buf.state_dict(), src.state_dict()
    a = buf.take(900)
    src.load_state_dict(src_state)
    buf.load_state_dict(state)
    assert torch.equal(buf.take(900), a)

    inner = TensorSource(rows(5000, 4))
    pf = PrefetchSource(inner, batch_size=64, depth=3)
    first = [pf.next_batch(64) for _ in range(5)]
    assert torch.equal(torch.cat(first), rows(5000, 4)[:320])
    state = pf.state_dict()
    later = [pf.next_batch(64) for _ in range(4)]
    pf.close()
    again = PrefetchSource(TensorSource(rows(5000, 4)), batch_size=64)
    again.load_state_dict(state)
    assert torch.equal(torch.cat([again.next_batch(64) for _ in range(4)]), torch.cat(later))
    # Another batch size (the trainer's norm estimate) reads on from the same stream.
    assert torch.equal(again.next_batch(10), rows(5000, 4)[576:586])
    again.close()


def test_prefetch_surfaces_errors():
    class Broken:
        d_in = 2

        def next_batch(self, n):
            raise FileFormatError("disk went away")

        def state_dict(self):
            return {}

    pf = PrefetchSource(Broken(), batch_size=4)
    with pytest.raises(FileFormatError, match="disk went away"):
        pf.next_batch(4)


class _WritesMarker:
    """Unpickling this creates `path`: the file's existence proves the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_old_pickle_writer_state_is_refused_and_never_run(tmp_path):
    import pickle

    write_cache(TensorSource(rows()), tmp_path / "c", tokens=300, identity=IDENTITY, shard_tokens=300)
    (tmp_path / "c" / "writer_state.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "c" / "writer_state.pt").write_bytes(pickle.dumps({"position": _WritesMarker(marker)}))
    with pytest.raises(FileFormatError, match=r"writer_state\.pt is a writer state in the old pickle format"):
        write_cache(TensorSource(rows()), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)
    assert not marker.exists()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["total_rows"] == 300  # nothing written
    # The shards already written stay readable, and a cache that needs no more rows is fine.
    assert cache_source(tmp_path / "c", IDENTITY).next_batch(300).shape == (300, 8)
    write_cache(TensorSource(rows()), tmp_path / "c", tokens=300, identity=IDENTITY, shard_tokens=300)
    assert not marker.exists()


def test_a_pickle_next_to_a_new_state_is_ignored(tmp_path):
    import pickle

    data_ND = rows()
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)
    marker = tmp_path / "pwned"
    (tmp_path / "c" / "writer_state.pt").write_bytes(pickle.dumps(_WritesMarker(marker)))
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=1000, identity=IDENTITY, shard_tokens=300)
    assert not marker.exists()
    _, segments = open_cache(tmp_path / "c")
    assert torch.equal(torch.cat([s.read(0, s.n) for s in segments]), data_ND)


def test_writer_state_round_trips_nested_tensors(tmp_path):
    from saelab.activations.cache import load_writer_state, save_writer_state

    g = torch.Generator().manual_seed(5)
    state = {
        "contexts": {"epoch": 2, "cursor": 17},
        "buffer": {"kept": rows(4, 3), "ready": torch.zeros(0, 3), "generator": g.get_state()},
        "prefetched": [rows(2, 3, 1), rows(2, 3, 2)],
        "note": None,
        "x": 0.5,
    }
    save_writer_state(tmp_path / "s.safetensors", state, rows=123)
    got, n = load_writer_state(tmp_path / "s.safetensors")
    assert n == 123
    assert got["contexts"] == {"epoch": 2, "cursor": 17} and got["note"] is None and got["x"] == 0.5
    assert torch.equal(got["buffer"]["kept"], state["buffer"]["kept"])
    assert got["buffer"]["ready"].shape == (0, 3)
    assert torch.equal(got["buffer"]["generator"], g.get_state())
    assert all(torch.equal(a, b) for a, b in zip(got["prefetched"], state["prefetched"]))


def test_corrupt_writer_state_is_a_file_error(tmp_path):
    write_cache(TensorSource(rows()), tmp_path / "c", tokens=300, identity=IDENTITY, shard_tokens=300)
    (tmp_path / "c" / "writer_state.safetensors").write_bytes(b"\x00\x01 not safetensors" * 8)
    with pytest.raises(FileFormatError, match="writer_state.safetensors is not a readable writer state"):
        write_cache(TensorSource(rows()), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)
    (tmp_path / "c" / "writer_state.safetensors").unlink()
    with pytest.raises(FileFormatError, match="no writer_state.safetensors"):
        write_cache(TensorSource(rows()), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)


def test_writer_killed_between_state_and_manifest_continues_exactly(tmp_path):
    # Shard 1 and the state after it are on disk, but the manifest was not updated yet.
    data_ND = rows()
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=600, identity=IDENTITY, shard_tokens=300)
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"], manifest["total_rows"], manifest["complete"] = manifest["shards"][:1], 300, False
    path.write_text(json.dumps(manifest))
    write_cache(TensorSource(data_ND), tmp_path / "c", tokens=1000, identity=IDENTITY, shard_tokens=300)
    _, segments = open_cache(tmp_path / "c")
    assert torch.equal(torch.cat([s.read(0, s.n) for s in segments]), data_ND)  # no rows skipped or repeated


def test_cache_command_continues_exactly_and_refuses_an_old_pickle(tiny_gpt2, corpus_path, tmp_path, capsys):
    """`saelab cache` on a real LM: the saved writer state (shuffle buffer rows, generator, corpus cursor)
    round-trips through safetensors, and an old pickle state is one error line, never unpickled."""
    import pickle

    pytest.importorskip("transformers")
    from saelab.cli import main

    def cache(out, tokens):
        with pytest.raises(SystemExit) as info:
            main(
                [
                    "cache",
                    "--model",
                    str(tiny_gpt2),
                    "--layer",
                    "1",
                    "--dataset",
                    str(corpus_path),
                    "--out",
                    str(out),
                    "--tokens",
                    tokens,
                    "--shard-tokens",
                    "1000",
                    "--context-size",
                    "32",
                    "--buffer-size",
                    "1024",
                    "--json",
                ]
            )
        return info.value.code, capsys.readouterr().err

    assert cache(tmp_path / "once", "3k")[0] == 0
    assert cache(tmp_path / "twice", "2k")[0] == 0
    assert cache(tmp_path / "twice", "3k")[0] == 0
    _, once = open_cache(tmp_path / "once")
    _, twice = open_cache(tmp_path / "twice")
    assert torch.equal(torch.cat([s.read(0, s.n) for s in once]), torch.cat([s.read(0, s.n) for s in twice]))

    (tmp_path / "twice" / "writer_state.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "twice" / "writer_state.pt").write_bytes(pickle.dumps(_WritesMarker(marker)))
    code, err = cache(tmp_path / "twice", "4k")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "old pickle format" in lines[0]
    assert not marker.exists()
