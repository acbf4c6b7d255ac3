"""The data layer: one DataSpec, one open_data, one activation-file reader for every command."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from saelab.data import DataSpec, TensorSource, is_paired, open_data
from saelab.errors import ConfigError, FileFormatError


def _rows(n: int = 64, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows_ND = _rows()
    np.save(tmp_path / "a.npy", rows_ND.numpy())
    from safetensors.torch import save_file

    save_file({"activations": rows_ND}, str(tmp_path / "a.safetensors"))
    torch.save({"activations": rows_ND}, tmp_path / "a.pt")
    for name in ("a.npy", "a.safetensors", "a.pt"):
        opened = open_data(DataSpec(activations=[str(tmp_path / name)]), eval_rows=6)
        assert opened.spec.kind == "files" and opened.d_in == 8 and not opened.has_ground_truth
        assert torch.equal(opened.source.next_batch(10), rows_ND[:10])
        assert opened.held_out_ND is not None and torch.equal(opened.held_out_ND, rows_ND[-6:])


def test_train_takes_a_pt_file(tmp_path):
    """`saelab l0 --activations x.pt` worked and `saelab train --activations x.pt` was refused."""
    from saelab.runs import RunConfig, run_training

    torch.save(_rows(512, 8), tmp_path / "acts.pt")
    cfg = RunConfig(
        activations=[str(tmp_path / "acts.pt")],
        arch=["topk"],
        l0=[2],
        width=16,
        samples=256,
        batch_size=64,
        eval_samples=32,
    )
    result = run_training(cfg, tmp_path / "run", progress=False)
    assert result.results[0]["l0"] == pytest.approx(2.0)
    assert "explained_variance" in result.results[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_a_pt_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(FileFormatError, match="evil.pt"):
        open_data(DataSpec(activations=[str(path)]))
    assert not marker.exists()


def test_a_file_or_cache_given_as_data_is_read_as_such(tmp_path):
    np.save(tmp_path / "a.npy", _rows().numpy())
    assert DataSpec(data=str(tmp_path / "a.npy")).kind == "files"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("{}")
    assert DataSpec(data=str(tmp_path / "c")).kind == "cache"
    assert DataSpec(data="synth-mini").kind == "synthetic"


def test_bad_specs_name_their_field(tmp_path):
    with pytest.raises(ConfigError, match="activations"):
        DataSpec(cache=str(tmp_path), activations=["x.npy"])
    with pytest.raises(ConfigError, match="layer"):
        DataSpec(model=str(tmp_path))
    with pytest.raises(ConfigError, match="activations='.*missing.npy'"):
        open_data(DataSpec(activations=[str(tmp_path / "missing.npy")]))
    with pytest.raises(ConfigError, match="context_size"):
        DataSpec(context_size=1)


def test_tensor_source_gives_aligned_pairs():
    x_ND, y_NE = _rows(10, 4), _rows(10, 3) * 2
    source = TensorSource(x_ND, y_NE)
    assert is_paired(source) and source.d_out == 3
    x, y = source.next_pair(7)
    x2, y2 = source.next_pair(7)  # wraps around: rows 7..9, then 0..3
    assert torch.equal(x, x_ND[:7]) and torch.equal(y, y_NE[:7])
    assert torch.equal(x2, x_ND[[7, 8, 9, 0, 1, 2, 3]]) and torch.equal(y2, y_NE[[7, 8, 9, 0, 1, 2, 3]])
    assert not is_paired(TensorSource(x_ND))


def test_synthetic_evaluation_batches_leave_the_training_stream_alone(tiny_synthetic_model_dir):
    a = open_data(DataSpec(data=str(tiny_synthetic_model_dir)), seed=3)
    b = open_data(DataSpec(data=str(tiny_synthetic_model_dir)), seed=3)
    held_1 = a.eval_batch(50, seed=9)
    first_a = a.source.next_batch(20)
    first_b = b.source.next_batch(20)
    assert torch.equal(first_a, first_b)  # the held-out draw did not move a's stream
    assert torch.equal(held_1, b.eval_batch(50, seed=9))  # and it is reproducible from its seed
    assert not torch.equal(held_1[:20], first_a)
