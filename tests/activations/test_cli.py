"""End to end: `saelab train --model/--cache/--activations`, `saelab cache`, `saelab l0` on LM activations."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from saelab.cli import main  # noqa: E402

GROUND_TRUTH = {"f1", "precision", "recall", "mcc", "uniqueness"}
SMALL = [
    "--arch",
    "topk",
    "--l0",
    "4",
    "--width",
    "64",
    "--samples",
    "8k",
    "--batch-size",
    "256",
    "--lr",
    "3e-3",
    "--context-size",
    "32",
    "--buffer-size",
    "2048",
    "--eval-samples",
    "1k",
]


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def last_json(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_train_on_model_json(tiny_gpt2, corpus_path, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_gpt2,
        "--layer",
        "1",
        "--dataset",
        corpus_path,
        *SMALL,
        "--out",
        tmp_path / "run",
        "--json",
    )
    assert code in (0, None), err
    [line] = last_json(out)
    assert not GROUND_TRUTH & set(line)
    assert line["l0"] == pytest.approx(4.0) and line["run_dir"] == str(tmp_path / "run")
    assert -1.0 < line["explained_variance"] <= 1.0 and line["samples_per_second"] > 0
    assert np.isfinite(line["ce_loss_recovered"]) and line["kl_div"] >= 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["layer"] == 1
    assert (tmp_path / "run" / "saes" / "topk-l0_4" / "sae_weights.safetensors").exists()


def test_cache_then_train_from_cache(tiny_gpt2, tiny_llama, corpus_path, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = run_cli(
        capsys,
        "cache",
        "--model",
        tiny_gpt2,
        "--layer",
        "1",
        "--dataset",
        corpus_path,
        "--out",
        cache,
        "--tokens",
        "6k",
        "--shard-tokens",
        "2500",
        "--context-size",
        "32",
        "--buffer-size",
        "2048",
        "--json",
    )
    assert code in (0, None), err
    [summary] = last_json(out)
    assert summary["rows"] == 6000 and summary["shards"] == 3 and summary["d_in"] == 32
    code, out, err = run_cli(capsys, "train", "--cache", cache, *SMALL, "--out", tmp_path / "run", "--json")
    assert code in (0, None), err
    [line] = last_json(out)
    assert "ce_loss_recovered" not in line and not GROUND_TRUTH & set(line) and line["l0"] == pytest.approx(4.0)
    # The same cache with the model it came from: spliced-LM metrics.
    code, out, err = run_cli(
        capsys,
        "train",
        "--cache",
        cache,
        "--model",
        tiny_gpt2,
        "--layer",
        "1",
        "--dataset",
        corpus_path,
        *SMALL,
        "--out",
        tmp_path / "run2",
        "--json",
    )
    assert code in (0, None), err
    assert "ce_loss_recovered" in last_json(out)[0]
    # ... but not with another model: a clear error, nothing trained.
    code, out, err = run_cli(
        capsys,
        "train",
        "--cache",
        cache,
        "--model",
        tiny_llama,
        "--layer",
        "1",
        *SMALL,
        "--out",
        tmp_path / "run3",
        "--json",
    )
    assert code == 2 and "cache=" in err and "model_fingerprint differs" in err
    assert not (tmp_path / "run3").exists()


def test_train_from_user_npy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.random((3000, 64)) < 0.05) @ rng.standard_normal((64, 16)).astype(np.float32))
    code, out, err = run_cli(
        capsys,
        "train",
        "--activations",
        tmp_path / "acts.npy",
        "--arch",
        "topk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "10k",
        "--batch-size",
        "250",
        "--lr",
        "3e-3",
        "--eval-samples",
        "300",
        "--out",
        tmp_path / "run",
        "--json",
    )
    assert code in (0, None), err
    [line] = last_json(out)
    assert line["explained_variance"] > 0.3 and "ce_loss_recovered" not in line


def test_bad_layer_via_cli(tiny_gpt2, corpus_path, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_gpt2,
        "--layer",
        "7",
        "--dataset",
        corpus_path,
        *SMALL,
        "--out",
        tmp_path / "run",
    )
    assert code == 2 and "layer=7" in err and "valid layers are 0..2" in err


def test_l0_sweep_on_model_activations(tiny_gpt2, corpus_path, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "l0",
        "--model",
        tiny_gpt2,
        "--layer",
        "1",
        "--dataset",
        corpus_path,
        "--context-size",
        "32",
        "--arch",
        "batchtopk",
        "--l0",
        "2..4",
        "--width",
        "32",
        "--samples",
        "6k",
        "--batch-size",
        "256",
        "--eval-samples",
        "512",
        "--out",
        tmp_path / "l0",
        "--json",
    )
    assert code in (0, None), err
    [summary] = last_json(out)
    assert summary["recommended_l0"] in (2, 3, 4)
    assert (tmp_path / "l0" / "l0_sweep.json").exists()


def test_dataset_without_text_column_via_cli(tiny_gpt2, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["the cat sat", "the old mill"]}).save_to_disk(str(tmp_path / "ds"))
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_gpt2,
        "--layer",
        "0",
        "--dataset",
        tmp_path / "ds",
        *SMALL,
        "--out",
        tmp_path / "run",
    )
    assert code == 2 and "text_column='text'" in err and "['body']" in err
    assert not (tmp_path / "run").exists()


def test_diagnose_a_run_trained_from_a_cache(tmp_path, capsys):
    import torch

    from saelab.activations.cache import write_cache
    from saelab.data import TensorSource

    rows_ND = (torch.rand(3000, 48, generator=torch.Generator().manual_seed(0)) < 0.06).float() @ torch.randn(48, 16)
    identity = {"model": "m", "model_fingerprint": "f", "layer": 0, "hook_module": "h.0", "d_in": 16}
    write_cache(TensorSource(rows_ND), tmp_path / "cache", tokens=3000, identity=identity, shard_tokens=1000)
    code, out, err = run_cli(
        capsys,
        "train",
        "--cache",
        tmp_path / "cache",
        "--arch",
        "topk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "10k",
        "--batch-size",
        "250",
        "--lr",
        "3e-3",
        "--eval-samples",
        "300",
        "--out",
        tmp_path / "run",
        "--json",
    )
    assert code in (0, None), err
    code, out, err = run_cli(capsys, "diagnose", tmp_path / "run", "--samples", "1000", "--json")
    assert code in (0, None), err
    [row] = last_json(out)
    assert row["l0"] == pytest.approx(3.0, abs=0.5) and "no ground truth" in " ".join(row["warnings"])
