"""`saelab l0 --saes ... --model M --layer N --dataset PATH` on a tiny local LM: a family the test trains
with `saelab l0` and re-saves in Gemma Scope's layout recommends what the sweep did."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from saelab.cli import main  # noqa: E402
from tests.diagnostics.foreign_formats import save_gemma_scope  # noqa: E402

L0S = ["2", "3", "4"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_l0_family_on_model_activations(tiny_gpt2, corpus_path, tmp_path, capsys):
    data = ["--model", tiny_gpt2, "--layer", "1", "--dataset", corpus_path, "--context-size", "32"]
    code, out, err = run_cli(
        capsys,
        "l0",
        *data,
        "--l0",
        *L0S,
        "--width",
        "32",
        "--samples",
        "6k",
        "--batch-size",
        "256",
        "--eval-samples",
        "512",
        "--out",
        tmp_path / "sweep",
        "--json",
    )
    assert code in (0, None), err
    sweep = last_json(out)
    folders = [save_gemma_scope(tmp_path / "sweep" / "saes" / f"batchtopk-l0_{k}", tmp_path / f"gs_{k}") for k in L0S]
    code, out, err = run_cli(
        capsys,
        "l0",
        "--saes",
        *folders,
        "--l0",
        *L0S,
        *data,
        "--eval-samples",
        "512",
        "--out",
        tmp_path / "f",
        "--json",
    )
    assert code in (0, None), err
    family = last_json(out)
    assert family["recommended_l0"] == sweep["recommended_l0"] and family["n"] == sweep["n"]
    for n in sweep["n"]:  # the same SAEs on the same held-out LM rows
        np.testing.assert_allclose(family["s_dec"][str(n)], sweep["s_dec"][str(n)], rtol=1e-4)
