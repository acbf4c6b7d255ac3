"""`--log-to tensorboard|wandb`: offline sinks mirroring the trainer's metrics per SAE and the final scores."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from saelab.cli import main
from saelab.errors import ConfigError
from saelab.runs import RunConfig, run_training
from saelab.training.tracking import flatten_final, flatten_log, parse_sinks


def config(model_dir, **overrides):
    base = dict(
        data=str(model_dir),
        arch=["batchtopk"],
        l0=[2, 3],
        width=32,
        samples=256 * 4,
        batch_size=256,
        lr=3e-3,
        eval_samples=1000,
        eval_every=2,
        checkpoint_minutes=0,
    )
    return RunConfig(**{**base, **overrides})


def test_sink_names_and_flattening():
    assert parse_sinks(["wandb,tensorboard", "TensorBoard"]) == ["wandb", "tensorboard"]
    assert parse_sinks("tensorboard") == ["tensorboard"] and parse_sinks(None) == []
    with pytest.raises(ConfigError, match="^log_to='mlflow': must be one of wandb, tensorboard"):
        parse_sinks(["wandb,mlflow"])
    with pytest.raises(ConfigError, match="^log_to='x'"):
        RunConfig(log_to=["x"])
    entry = {"step": 4, "samples_per_second": 10.0, "a/loss": 1.5, "a/l0": 3, "a/bad": float("nan"), "a/s": "x"}
    assert flatten_log(entry) == {"train/samples_per_second": 10.0, "a/loss": 1.5, "a/l0": 3.0}
    assert flatten_log({"step": 2, "eval": {"a": {"mcc": 0.5}, "b": {"mcc": 0.25}}}) == {
        "a/eval/mcc": 0.5,
        "b/eval/mcc": 0.25,
    }
    final = {"a": {"name": "a", "seed": 0, "l0_target": 3.0, "f1": 0.75, "train_stats": {"loss": 1.0}}}
    assert flatten_final(final) == {"a/final/f1": 0.75}


def test_tensorboard_run_writes_event_files_a_reader_parses(tiny_synthetic_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    result = run_training(config(tiny_synthetic_model_dir, log_to=["tensorboard"]), run_dir, progress=False)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("batchtopk-l0_2", "batchtopk-l0_3"):  # one namespace per SAE of the sweep
        for metric in ("loss", "l0", "explained_variance", "dead_latents", "lr", "loss/mse"):
            assert f"{name}/{metric}" in tags, (name, metric, sorted(tags))
        assert f"{name}/eval/mcc" in tags and f"{name}/final/mcc" in tags and f"{name}/final/f1" in tags
    assert "train/samples_per_second" in tags
    history = json.loads((run_dir / "run.json").read_text())["history"]
    logged = [h for h in history if "eval" not in h]
    loss = acc.Scalars("batchtopk-l0_3/loss")
    assert [e.step for e in loss] == [h["step"] for h in logged] == [4]
    assert loss[0].value == pytest.approx(logged[0]["batchtopk-l0_3/loss"], rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("batchtopk-l0_3/eval/mcc")] == [2]
    final = acc.Scalars("batchtopk-l0_2/final/mcc")
    record = next(r for r in result.results if r["name"] == "batchtopk-l0_2")
    assert final[0].step == 4 and final[0].value == pytest.approx(record["mcc"], rel=1e-6)
    assert json.loads((run_dir / "run.json").read_text())["config"]["log_to"] == ["tensorboard"]


def test_wandb_offline_run_writes_a_run_folder(tiny_synthetic_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # Offline by construction; an unreachable server makes any attempt to go online fail rather than hang.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    run_training(config(tiny_synthetic_model_dir, log_to=["wandb"], l0=[3], eval_every=0), run_dir, progress=False)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data_files = list(runs[0].glob("run-*.wandb"))
    assert len(data_files) == 1
    # wandb's service may still be writing the records when finish() returns: wait for them (≤ 60 s).
    deadline = time.monotonic() + 60
    while b"batchtopk-l0_3/final/mcc" not in data_files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    blob = data_files[0].read_bytes()  # the records hold the metric names as plain strings
    assert b"batchtopk-l0_3/loss" in blob and b"batchtopk-l0_3/final/mcc" in blob


def test_missing_package_is_a_one_line_error_naming_the_extra(tiny_synthetic_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^log_to='tensorboard': .*pip install 'saelab\[tensorboard\]'"):
        run_training(config(tiny_synthetic_model_dir, log_to=["tensorboard"]), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["train", "--data", str(tiny_synthetic_model_dir), "--log-to", "tensorboard", "--out", str(tmp_path / "c")]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "saelab[tensorboard]" in err and len(err.strip().splitlines()) == 1


def test_saelab_trains_without_either_package(tiny_synthetic_model_dir, tmp_path, monkeypatch):
    for module in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of them would now fail
    cfg = config(tiny_synthetic_model_dir, l0=[3], samples=512, eval_every=0, eval_samples=500)
    run_training(cfg, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "complete"
