"""`saelab l0 --saes DIR ...`: the correct-L0 check on a family of pretrained SAEs, here one the test trains
with `saelab l0` and re-saves in Gemma Scope's layout (params.npz), must recommend what the sweep did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import saelab.cli.diagnose  # noqa: F401  (registers l0)
from saelab.cli import app
from saelab.cli.common import expand_multi_value_args
from saelab.errors import ConfigError, FileFormatError
from tests.diagnostics.foreign_formats import save_gemma_scope

runner = CliRunner()
L0S = [7, 9, 11, 13, 15]


def invoke(*args):
    return runner.invoke(app, expand_multi_value_args([str(a) for a in args]), env={"COLUMNS": "200"})


def last_json(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """An activation file from the sbw-toy model (true L0 ≈ 11), saelab's own sweep over it, and the
    sweep's SAEs re-saved as Gemma Scope folders (a format saelab did not write)."""
    from saelab.diagnostics.data import sample_model
    from saelab.synthetic import load_source

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("family")
    acts = root / "toy.pt"
    torch.save(sample_model(load_source("sbw-toy"), 20_000, seed=1).float().clone(), acts)
    sweep = last_json(
        invoke(
            "l0", "--data", acts, "--l0", *L0S, "--width", "50", "--samples", "40k", "--out", root / "sweep", "--json"
        )
    )
    folders = [save_gemma_scope(root / "sweep" / "saes" / f"batchtopk-l0_{k}", root / "gs" / f"l0_{k}") for k in L0S]
    return acts, root, sweep, folders


def test_foreign_family_recommends_what_the_sweep_did(family, tmp_path):
    from saelab.saes.formats import detect_format

    acts, root, sweep, folders = family
    assert all(detect_format(f) == "gemma_scope" for f in folders)
    assert sweep["recommended_l0"] in L0S

    # Labelled with the sweep's L0s: the rule sees the same scores and recommends the same L0.
    given = last_json(
        invoke("l0", "--saes", *folders, "--l0", *L0S, "--activations", acts, "--out", tmp_path / "g", "--json")
    )
    assert given["l0_source"] == "given" and given["recommended_l0"] == sweep["recommended_l0"]
    assert given["n"] == sweep["n"] and given["floor_l0s"] == sweep["floor_l0s"]
    for n in sweep["n"]:  # the same SAEs on the same held-out rows, read back from another format
        np.testing.assert_allclose(given["s_dec"][str(n)], sweep["s_dec"][str(n)], rtol=1e-4)
    np.testing.assert_allclose(given["decoder_abs_cos"], sweep["decoder_abs_cos"], rtol=1e-4)

    # Unlabelled (Gemma Scope files carry no L0): placed at their measured L0s, the same SAE is recommended.
    measured = last_json(invoke("l0", "--saes", *folders, "--activations", acts, "--out", tmp_path / "m", "--json"))
    assert measured["l0_source"] == "measured"
    np.testing.assert_allclose(measured["l0"], sweep["l0_measured"], atol=0.01)
    best = Path(measured["recommended_sae"]).name
    assert best == f"l0_{sweep['recommended_l0']:g}", (measured, sweep)
    assert (tmp_path / "m" / "l0_sweep.json").exists() and (tmp_path / "m" / "l0_sweep.png").exists()


def test_saelab_run_folder_uses_its_recorded_l0s(family, tmp_path):
    acts, root, sweep, _ = family
    d = last_json(invoke("l0", "--saes", root / "sweep", "--activations", acts, "--out", tmp_path / "r", "--json"))
    assert d["l0_source"] == "recorded" and d["l0"] == L0S
    assert d["recommended_l0"] == sweep["recommended_l0"] and d["combined_score"] == pytest.approx(
        sweep["combined_score"], abs=1e-6
    )


def test_family_errors_are_one_line(family, tmp_path):
    acts, root, _, folders = family
    r = invoke("l0", "--saes", *folders[:2], "--width", "50", "--activations", acts, "--out", tmp_path / "a")
    assert isinstance(r.exception, ConfigError) and "--width trains a sweep" in str(r.exception)
    r = invoke("l0", "--saes", *folders[:2], "--l0", "7", "--activations", acts, "--out", tmp_path / "b")
    assert isinstance(r.exception, ConfigError) and "one L0 per SAE folder (2)" in str(r.exception)
    r = invoke(
        "l0", "--saes", folders[0], "--data", "sbw-toy", "--activations", tmp_path / "x.pt", "--out", tmp_path / "c"
    )
    assert r.exception is not None and "x.pt" in str(r.exception)
    other = tmp_path / "acts16.pt"
    torch.save(torch.randn(400, 16), other)
    r = invoke("l0", "--saes", folders[0], "--activations", other, "--out", tmp_path / "d")
    assert isinstance(r.exception, ConfigError) and "d_in=100" in str(r.exception) and "d_in=16" in str(r.exception)
    r = invoke("l0", "--saes", tmp_path / "nothing", "--activations", acts, "--out", tmp_path / "e")
    assert isinstance(r.exception, FileFormatError) and "nothing" in str(r.exception)
    r = invoke("l0", "--saes", folders[0], folders[0], "--activations", acts, "--out", tmp_path / "f")
    assert isinstance(r.exception, ConfigError) and "named twice" in str(r.exception)
