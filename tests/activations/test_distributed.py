"""Data-parallel training: `torchrun --nproc-per-node 2 -m saelab train` (gloo, CPU) trains the same
SAE as one process on the same data, and a 2-rank run on a live LM completes with one run folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab.runs import RunConfig, run_training

ARGS = [
    "--arch",
    "topk",
    "--l0",
    "4",
    "--width",
    "32",
    "--samples",
    "6400",
    "--batch-size",
    "128",
    "--lr",
    "3e-3",
    "--eval-samples",
    "200",
    "--dead-feature-window",
    "10000",
    "--json",
]

# The same settings as ARGS, for the one-process run.
SINGLE = dict(
    arch=["topk"], l0=[4], width=32, samples=6400, batch_size=128, lr=3e-3, eval_samples=200, dead_feature_window=10000
)


def torchrun(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "saelab",
        "train",
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_gloo_ranks_match_one_process(tmp_path):
    rng = np.random.default_rng(0)
    codes = (rng.random((4096, 64)) < 0.05) * rng.random((4096, 64))
    np.save(tmp_path / "acts.npy", (codes @ rng.standard_normal((64, 16))).astype(np.float32))
    single = run_training(
        RunConfig(activations=[str(tmp_path / "acts.npy")], **SINGLE),
        tmp_path / "single",
        progress=False,
    )
    out = torchrun("--activations", tmp_path / "acts.npy", *ARGS, "--out", tmp_path / "dist")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    a = load_file(str(tmp_path / "single" / "saes" / "topk-l0_4" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "dist" / "saes" / "topk-l0_4" / "sae_weights.safetensors"))
    moved = (a["W_dec"] - b["W_dec"]).abs().max()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    assert lines[0]["explained_variance"] == pytest.approx(single.results[0]["explained_variance"], abs=1e-5)
    assert float(moved) < 1e-5
    # Training actually moved the weights away from initialisation (so the match is not trivial).
    assert single.results[0]["explained_variance"] > 0.3
    assert not (tmp_path / "dist" / "checkpoint.pt").exists()


def test_two_ranks_on_live_lm(tiny_gpt2, corpus_path, tmp_path):
    pytest.importorskip("transformers")
    out = torchrun(
        "--model",
        tiny_gpt2,
        "--layer",
        "1",
        "--dataset",
        corpus_path,
        "--context-size",
        "32",
        "--buffer-size",
        "1024",
        "--arch",
        "topk",
        "--l0",
        "4",
        "--width",
        "32",
        "--samples",
        "4k",
        "--batch-size",
        "256",
        "--eval-samples",
        "500",
        "--out",
        tmp_path / "run",
        "--json",
    )
    [line] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert "ce_loss_recovered" in line and line["l0"] == pytest.approx(4.0)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


def test_two_gloo_ranks_train_the_same_skip_transcoder_as_one_process(tmp_path):
    """Transcoders under torchrun: each rank reads its share of a paired cache's (x, y) rows, and the
    result (skip weights included) equals one process on the same rows."""
    from saelab.activations.cache import write_cache
    from saelab.data import TensorSource

    rng = np.random.default_rng(1)
    codes = (rng.random((4096, 64)) < 0.05) * rng.random((4096, 64))
    x_ND = torch.from_numpy((codes @ rng.standard_normal((64, 16))).astype(np.float32))
    y_NE = torch.from_numpy((codes @ rng.standard_normal((64, 12))).astype(np.float32)) + 0.3 * x_ND[:, :12]
    identity = {
        "model": "m",
        "model_fingerprint": "f",
        "layer": None,
        "hook_module": "h.0.mlp:input",
        "d_in": 16,
        "out_hook_module": "h.0.mlp",
        "d_out": 12,
    }
    write_cache(TensorSource(x_ND, y_NE), tmp_path / "c", tokens=4096, identity=identity, shard_tokens=1024)
    single = run_training(
        RunConfig(cache=str(tmp_path / "c"), transcoder="skip", **SINGLE),
        tmp_path / "single",
        progress=False,
    )
    out = torchrun("--cache", tmp_path / "c", "--transcoder", "skip", *ARGS, "--out", tmp_path / "dist")
    [line] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]  # only rank 0 reports
    a = load_file(str(tmp_path / "single" / "saes" / "topk-l0_4" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "dist" / "saes" / "topk-l0_4" / "sae_weights.safetensors"))
    assert "W_skip" in a and a["W_skip"].shape == (12, 16)
    assert a["W_skip"].abs().max() > 0.05  # the skip learned something (y holds 0.3 x[:, :12])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    assert line["fvu"] == pytest.approx(single.results[0]["fvu"], abs=1e-5)
