"""saelab's folder format: round trips, and clear errors for broken folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import FileFormatError
from saelab.synthetic import (
    FullCorrelationConfig,
    SyntheticModel,
    load_source,
    load_synthetic_model,
    save_synthetic_model,
)
from tests.synthetic.synth_helpers import small_config


@pytest.fixture()
def saved(tmp_path):
    model = SyntheticModel(small_config())
    save_synthetic_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_reproduces_model_and_stream(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "hierarchy.json",
        "saelab_synthetic.json",
        "synthetic_model.safetensors",
        "synthetic_model_config.json",
    ]
    loaded = load_synthetic_model(path)
    for name in ("feature_vectors_FD", "bias_D", "firing_probabilities_F", "mean_magnitudes_F", "std_magnitudes_F"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    assert torch.equal(loaded.low_rank.factor_FR, model.low_rank.factor_FR)
    assert loaded.hierarchy == model.hierarchy
    assert loaded.cfg == model.cfg
    fresh = SyntheticModel(small_config())
    assert torch.equal(loaded.sample(400), fresh.sample(400))  # same sampling seed, same stream
    assert not list(path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_full_correlation_round_trip_without_saelens_config(tmp_path):
    cfg = small_config(
        num_features=40,
        hierarchy=None,
        correlation=FullCorrelationConfig((0.4 * torch.ones(40, 40) + 0.6 * torch.eye(40)).tolist()),
    )
    model = SyntheticModel(cfg)
    save_synthetic_model(model, tmp_path / "full")
    assert not (tmp_path / "full" / "synthetic_model_config.json").exists()  # SAELens cannot express it
    assert not (tmp_path / "full" / "hierarchy.json").exists()
    loaded = load_source(str(tmp_path / "full"))
    assert torch.equal(loaded.correlation_matrix_FF, model.correlation_matrix_FF)
    assert torch.equal(loaded.sample(100), SyntheticModel(cfg).sample(100))


def test_resave_removes_stale_hierarchy(saved, tmp_path):
    _, path = saved
    save_synthetic_model(SyntheticModel(small_config(hierarchy=None)), path)
    assert not (path / "hierarchy.json").exists()
    assert load_synthetic_model(path).hierarchy is None


def test_missing_folder_and_unknown_contents(tmp_path):
    with pytest.raises(FileFormatError, match="not a directory"):
        load_synthetic_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="saelab_synthetic.json"):
        load_synthetic_model(tmp_path / "empty")


def test_corrupt_json_names_the_file(saved):
    _, path = saved
    (path / "saelab_synthetic.json").write_text("{not json")
    with pytest.raises(FileFormatError, match=r"saelab_synthetic\.json: not valid JSON"):
        load_synthetic_model(path)


def test_wrong_format_version(saved):
    _, path = saved
    meta = json.loads((path / "saelab_synthetic.json").read_text())
    meta["version"] = 99
    (path / "saelab_synthetic.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="unsupported format version 99"):
        load_synthetic_model(path)


def test_invalid_config_in_file(saved):
    _, path = saved
    meta = json.loads((path / "saelab_synthetic.json").read_text())
    meta["config"]["hidden_dim"] = -3
    (path / "saelab_synthetic.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match=r"saelab_synthetic\.json: invalid config: hidden_dim=-3"):
        load_synthetic_model(path)


def test_truncated_weights(saved):
    _, path = saved
    w = path / "synthetic_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=r"synthetic_model\.safetensors: not a readable safetensors file"):
        load_synthetic_model(path)


def test_missing_weights(saved):
    _, path = saved
    (path / "synthetic_model.safetensors").unlink()
    with pytest.raises(FileFormatError, match=r"synthetic_model\.safetensors: missing"):
        load_synthetic_model(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.pop("feature_vectors"), "missing tensor 'feature_vectors'"),
        (
            lambda w: w.__setitem__("feature_vectors", torch.zeros(3, 3)),
            r"'feature_vectors' has shape \(3, 3\), expected \(400, 32\)",
        ),
        (lambda w: w.__setitem__("bias", torch.zeros(31)), r"'bias' has shape \(31,\)"),
        (lambda w: w.__setitem__("firing_probabilities", torch.full((400,), 1.5)), "outside \\[0, 1\\]"),
        (lambda w: w.__setitem__("firing_probabilities", torch.full((400,), float("nan"))), "NaN"),
        (lambda w: w.__setitem__("correlation_factor", torch.zeros(400, 7)), "rank 7 but the config says rank 5"),
        (lambda w: w.__setitem__("correlation_diag", torch.zeros(400)), "'correlation_diag' must be > 0"),
        (lambda w: w.__setitem__("feature_vectors", torch.zeros(400, 32, dtype=torch.int32)), "dtype torch.int32"),
    ],
)
def test_bad_tensors_name_file_and_tensor(saved, mutate, message):
    _, path = saved
    wfile = path / "synthetic_model.safetensors"
    weights = load_file(str(wfile))
    mutate(weights)
    save_file(weights, str(wfile))
    with pytest.raises(FileFormatError, match=message) as info:
        load_synthetic_model(path)
    assert "synthetic_model.safetensors" in str(info.value)


def test_bad_hierarchy_file(saved):
    _, path = saved
    (path / "hierarchy.json").write_text(json.dumps({"roots": [{"feature_index": 4000}]}))
    with pytest.raises(FileFormatError, match=r"hierarchy\.json: invalid hierarchy: .*must be < num_features"):
        load_synthetic_model(path)
    (path / "hierarchy.json").write_text(json.dumps([1, 2]))
    with pytest.raises(FileFormatError, match=r"hierarchy\.json"):
        load_synthetic_model(path)


def test_save_onto_a_file_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileFormatError, match="not a directory"):
        save_synthetic_model(SyntheticModel(small_config(hierarchy=None)), tmp_path / "f")


def test_preset_cache(tmp_path, monkeypatch):
    from saelab.synthetic import build_preset

    monkeypatch.setenv("SAELAB_SYNTH_CACHE", str(tmp_path / "cache"))
    first = build_preset("sbw-toy")
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("sbw-toy-")
    again = load_source("sbw-toy")  # loaded, not rebuilt
    assert torch.equal(again.feature_vectors_FD, first.feature_vectors_FD)
    assert torch.equal(again.sample(50), build_preset("sbw-toy", cache_dir="").sample(50))
    # A damaged entry is rebuilt rather than trusted.
    (entries[0] / "synthetic_model.safetensors").write_bytes(b"junk")
    rebuilt = build_preset("sbw-toy")
    assert torch.equal(rebuilt.feature_vectors_FD, first.feature_vectors_FD)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
