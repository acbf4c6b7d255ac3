"""`saelab l0`, `saelab diagnose`, `saelab theory ...` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

try:  # every command module; a colleague's unfinished module must not block these tests
    from saelab.cli import _register

    _register()
except Exception:  # noqa: BLE001
    pass
import saelab.cli.diagnose  # noqa: E402,F401  (registers l0 / diagnose / theory if _register does not yet)
from saelab.cli import app  # noqa: E402
from saelab.cli.common import expand_multi_value_args  # noqa: E402
from saelab.errors import ConfigError, FileFormatError  # noqa: E402

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, expand_multi_value_args(list(args)), env={"COLUMNS": "200"})


def last_json(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def test_theory_superposition_json():
    d = last_json(invoke("theory", "superposition", "--d", "768", "--n", "16384", "--json"))
    assert d["expected_mean_max_abs_cos"] == pytest.approx(0.1485, abs=5e-5)
    assert d["approximation"] == pytest.approx(0.159, abs=5e-4)
    assert "simulated" not in d
    d = last_json(invoke("theory", "superposition", "--d", "4096", "--n", "10^13", "--json"))
    assert d["expected_mean_max_abs_cos"] == pytest.approx(0.117, abs=5e-4)


def test_theory_superposition_simulate_table_and_plot(tmp_path):
    d = last_json(
        invoke(
            "theory",
            "superposition",
            "--d",
            "64",
            "--n",
            "512",
            "--simulate",
            "--queries",
            "256",
            "--max-interference",
            "0.3",
            "--json",
        )
    )
    assert abs(d["simulated"] - d["expected_mean_max_abs_cos"]) < 0.02
    assert d["inverse"][0]["max_interference"] == 0.3
    png = tmp_path / "sup.png"
    r = invoke("theory", "superposition", "--d", "768", "--n", "16k", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert "closed form" in r.output and png.stat().st_size > 1000


def test_theory_absorption():
    d = last_json(
        invoke("theory", "absorption", "--p-both", "0.25", "--p-parent-only", "0.25", "--lam", "0.1", "--json")
    )
    assert d["loss_faithful"] == pytest.approx(0.075)
    assert d["loss_absorbing"] == pytest.approx(0.1 * (0.25 + 2**0.5 * 0.25))
    assert d["preferred"] == "absorbing"
    r = invoke("theory", "absorption", "--p-both", "0.25", "--p-parent-only", "0.25", "--lam", "0.1")
    assert r.exit_code == 0 and "absorbing" in r.output


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (["theory", "superposition", "--n", "1"], ConfigError, "n="),
        (["theory", "superposition", "--d", "1"], ConfigError, "d="),
        (["theory", "superposition", "--max-interference", "2"], ConfigError, "max_interference"),
        (["theory", "absorption", "--p-both", "0.7", "--p-parent-only", "0.7", "--lam", "1"], ConfigError, "p_both"),
        (["l0", "--data", "sbw-toy", "--l0", "5.5", "--json"], ConfigError, "l0=.*integer"),
        (["l0", "--data", "sbw-toy", "--l0", "0", "10", "--json"], ConfigError, "l0=.*positive"),
        (["l0", "--data", "sbw-toy", "--l0", "abc", "--json"], ConfigError, "l0='abc'"),
        (["l0", "--data", "sbw-toy", "--l0", "10", "60", "--json"], ConfigError, "smaller than the SAE width 50"),
        (
            ["l0", "--data", "sbw-toy", "--l0", "5", "10", "--n", "50", "--json"],
            ConfigError,
            "n=50.*smaller than the SAE width",
        ),
        (["l0", "--data", "sbw-toy", "--l0", "5", "10", "--n", "2.5", "--json"], ConfigError, "n="),
        (["l0", "--data", "no-such-preset", "--l0", "5", "--json"], ConfigError, "no-such-preset"),
    ],
)
def test_bad_input(args, exc, match):
    r = invoke(*args)
    assert r.exit_code != 0
    assert isinstance(r.exception, exc), r.output
    assert r.exception is not None and __import__("re").search(match, str(r.exception)), str(r.exception)


def test_l0_sweep_and_diagnose_end_to_end(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "sweep"
    d = last_json(
        invoke(
            "l0",
            "--data",
            "sbw-toy",
            "--l0",
            "4..12:4",
            "--samples",
            "40k",
            "--gt-eval-samples",
            "2k",
            "--out",
            str(out),
            "--json",
        )
    )
    assert d["recommended_l0"] in (4, 8, 12)
    assert d["l0"] == [4, 8, 12]
    assert set(d["s_dec"]) == {str(n) for n in d["n"]} and all(len(v) == 3 for v in d["s_dec"].values())
    assert len(d["decoder_abs_cos"]) == 3 and d["true_l0"] == pytest.approx(11, abs=0.3)
    assert (out / "l0_sweep.png").stat().st_size > 1000 and (out / "l0_sweep.json").exists()
    assert (out / "run.json").exists() and len(list((out / "saes").iterdir())) == 3

    rows = [json.loads(line) for line in invoke("diagnose", str(out), "--samples", "2k", "--json").output.splitlines()]
    assert len(rows) == 3 and all("recall_weighted" in r and "s_dec" in r for r in rows)
    assert (out / "diagnostics" / "diagnostics.json").exists()
    assert (out / "diagnostics" / f"{rows[0]['name']}.png").exists()

    # an SAE and data of different widths
    r = invoke("diagnose", str(out), "--data", "synth-mini", "--samples", "1k")
    assert isinstance(r.exception, ConfigError) and "width" in str(r.exception)
    r = invoke("diagnose", str(tmp_path / "nothing"))
    assert isinstance(r.exception, FileFormatError)


def test_l0_on_activation_file(tmp_path):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    acts = (torch.rand(3000, 12, generator=g) < 0.2).float() @ feats
    path = tmp_path / "acts.pt"
    torch.save(acts, path)
    d = last_json(
        invoke(
            "l0",
            "--data",
            str(path),
            "--l0",
            "2",
            "3",
            "4",
            "--width",
            "24",
            "--samples",
            "20k",
            "--out",
            str(tmp_path / "o"),
            "--json",
        )
    )
    assert d["true_l0"] is None and d["ground_truth"] is None
    assert d["recommended_l0"] in (2, 3, 4)
    # diagnose on real-model-style activations: only the ground-truth-free metrics
    one_sae = next((tmp_path / "o" / "saes").iterdir())
    rows = [json.loads(x) for x in invoke("diagnose", str(one_sae), "--data", str(path), "--json").output.splitlines()]
    assert len(rows) == 1 and rows[0]["s_dec"] is not None and 0 <= rows[0]["decoder_abs_cos"] <= 1
    assert any("no ground truth" in w for w in rows[0]["warnings"])
    import shutil

    lone = shutil.copytree(one_sae, tmp_path / "lone")  # outside a run folder: nothing names its data
    r = invoke("diagnose", str(lone))
    assert isinstance(r.exception, ConfigError) and "--data" in str(r.exception)
    r = invoke("l0", "--data", str(tmp_path / "missing.pt"), "--l0", "2", "--json")
    assert (
        isinstance(r.exception, ConfigError)
        and "missing.pt" in str(r.exception)
        and "does not exist" in str(r.exception)
    )


def test_l0_table_output(tmp_path):
    torch.set_num_threads(1)
    r = invoke(
        "l0",
        "--data",
        "sbw-toy",
        "--l0",
        "4",
        "8",
        "--samples",
        "8k",
        "--gt-eval-samples",
        "1k",
        "--out",
        str(tmp_path / "t"),
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert "recommended L0" in r.output and "valley floor" in r.output
    assert "true L0 of the first 50 features" in r.output
