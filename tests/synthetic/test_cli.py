"""`saelab synth ...` commands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import saelab.cli.synth as synth_cli  # registers the `synth` sub-app
from saelab.cli import app
from saelab.errors import ConfigError
from saelab.synthetic import SyntheticModel, save_synthetic_model
from tests.synthetic.synth_helpers import small_config

runner = CliRunner()


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # exactly one JSON object
    return json.loads(lines[0])


def test_describe_json_on_a_preset():
    out = _json(runner.invoke(app, ["synth", "describe", "sbw-toy", "--samples", "20000", "--json"]))
    for key in ("num_features", "hidden_dim", "true_l0", "l0_first_width", "mean_max_abs_cos", "build_seconds"):
        assert key in out
    assert (out["num_features"], out["hidden_dim"]) == (50, 100)
    assert out["true_l0"] == pytest.approx(10.95, abs=0.15)  # 20k samples: SE ≈ 0.023
    assert out["hierarchy"] is None
    assert out["reference"] == {"true_l0": 11.0}


def test_describe_table_and_path_source(tmp_path):
    save_synthetic_model(SyntheticModel(small_config()), tmp_path / "m")
    result = runner.invoke(app, ["synth", "describe", str(tmp_path / "m"), "--samples", "2000", "--width", "50"])
    assert result.exit_code == 0, result.output
    assert "true L0" in result.stdout and "L0 of first 50 features" in result.stdout
    out = _json(
        runner.invoke(
            app,
            ["synth", "describe", str(tmp_path / "m"), "--samples", "2000", "--width", "50", "--seed", "3", "--json"],
        )
    )
    assert out["width"] == 50 and out["hierarchy"]["num_roots"] == 6
    assert 0 < out["l0_first_width"] <= out["true_l0"]


def test_sample_json_and_out_file(tmp_path):
    save_synthetic_model(SyntheticModel(small_config()), tmp_path / "m")
    out_file = tmp_path / "s.safetensors"
    out = _json(
        runner.invoke(
            app,
            [
                "synth",
                "sample",
                str(tmp_path / "m"),
                "--samples",
                "2500",
                "--batch-size",
                "1000",
                "--out",
                str(out_file),
                "--json",
            ],
        )
    )
    assert out["samples"] == 2500 and out["samples_per_second"] > 0 and "build_seconds" in out
    t = load_file(str(out_file))
    assert t["hidden"].shape == (2500, 32)
    assert t["feature_batch_idx"].max() == 2499
    # The stored COO features decode to the stored hidden activations.
    model = SyntheticModel(small_config())
    dense = torch.zeros(2500, 400)
    dense[t["feature_batch_idx"], t["feature_idx"]] = t["feature_values"]
    assert torch.allclose(dense @ model.feature_vectors_FD + model.bias_D, t["hidden"], atol=1e-4)


def test_sample_plain_output():
    result = runner.invoke(app, ["synth", "sample", "sbw-toy", "--samples", "1000"])
    assert result.exit_code == 0, result.output
    assert "build_seconds:" in result.stdout and "samples_per_second:" in result.stdout


def test_save_command(tmp_path):
    out = _json(runner.invoke(app, ["synth", "save", "sbw-toy", "--out", str(tmp_path / "sbw"), "--json"]))
    assert out["preset"] == "sbw-toy"
    assert (tmp_path / "sbw" / "saelab_synthetic.json").exists()
    loaded = synth_cli.load_source(str(tmp_path / "sbw"))
    assert loaded.num_features == 50


def test_save_with_changed_fields(tmp_path):
    out = _json(
        runner.invoke(
            app,
            [
                "synth",
                "save",
                "sbw-toy",
                "--set",
                "seed=7",
                "--set",
                "bias=0.25",
                "--out",
                str(tmp_path / "m"),
                "--json",
            ],
        )
    )
    assert out["set"] == {"seed": 7, "bias": 0.25}
    loaded = synth_cli.load_source(str(tmp_path / "m"))
    assert loaded.cfg.seed == 7 and loaded.cfg.bias == 0.25
    assert loaded.bias_D.norm().item() == pytest.approx(0.25, rel=1e-5)
    default = synth_cli.load_source("sbw-toy")
    assert not torch.equal(loaded.feature_vectors_FD, default.feature_vectors_FD)  # another seed, another model


@pytest.mark.parametrize(
    "setting, field, fragment",
    [
        ("bogus=1", "--set", "not a field of tc-mini"),
        ("skip_scale", "--set", "KEY=VALUE"),
        ("input={}", "--set", "nested config"),
        ("input_noise_std=-1", "input_noise_std", ">= 0"),
        ("skip_scale=big", "skip_scale", "finite number"),
    ],
)
def test_save_with_bad_fields_names_them_before_building(tmp_path, setting, field, fragment):
    result = runner.invoke(app, ["synth", "save", "tc-mini", "--set", setting, "--out", str(tmp_path / "m")])
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.field == field and fragment in str(result.exception)
    assert not (tmp_path / "m").exists()  # nothing written, and no minute-long build first


def test_errors_name_the_problem():
    result = runner.invoke(app, ["synth", "describe", "not-a-preset"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert "sbw-toy" in str(result.exception) and "synth-16k" in str(result.exception)
    result = runner.invoke(app, ["synth", "sample", "sbw-toy", "--samples", "0"])
    assert isinstance(result.exception, ConfigError) and result.exception.field == "--samples"
    result = runner.invoke(app, ["synth", "describe", "sbw-toy", "--width", "51", "--samples", "10"])
    assert isinstance(result.exception, ConfigError) and result.exception.field == "--width"
