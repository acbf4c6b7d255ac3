"""`saelab report` on a run trained straight from a (tiny, local) language model: no ground truth, so only the
sections that need none — and those re-read held-out activations from the same model, layer and corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from saelab.cli import main  # noqa: E402
from saelab.report import build_report  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "activations" / "data" / "corpus.txt"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    from saelab.activations.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("report-lm")
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    model = build_tiny_causal_lm(root / "model", lines, arch="gpt2", d_model=32, n_layers=2, context_size=32, seed=0)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train",
                "--model",
                str(model),
                "--layer",
                "1",
                "--dataset",
                str(CORPUS),
                "--arch",
                "topk",
                "--l0",
                "3",
                "6",
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
                "--out",
                str(root / "run"),
                "--json",
            ]
        )
    assert info.value.code in (0, None)
    return root / "run"


def test_language_model_run_shows_the_sections_that_need_no_ground_truth(lm_run, tmp_path):
    record = json.loads((lm_run / "run.json").read_text())
    assert not any("f1" in r for r in record["results"])  # the premise: no ground-truth scores
    out = tmp_path / "lm.html"
    result = build_report(lm_run, out, eval_samples=5_000)
    assert set(result.shown) == {"l0-sweep", "training", "geometry", "provenance"}, result.omitted
    assert set(result.omitted) == {"leaderboard", "tradeoff", "features", "dictionary"} and not result.partial
    text = out.read_text()
    geometry = re.search(r'<section id="geometry">(.*?)</section>', text, re.S).group(1)
    assert "CE loss recovered" in geometry and "s_n^dec" in geometry and "need input activations" not in geometry
    sweep = re.search(r'<section id="l0-sweep">(.*?)</section>', text, re.S).group(1)
    assert "Recommended L0" in sweep and "true L0 of the first" not in sweep
    assert record["config"]["model"] in text  # provenance names the model it was trained on
