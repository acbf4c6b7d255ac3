"""`saelab bench` with another budget than its protocol's: its own leaderboard entry; `--eval-samples`; JSON kinds."""

from __future__ import annotations

import json

import pytest

from saelab.bench.store import ResultsStore
from saelab.cli import main
from tests.bench.conftest import install_tiny_protocol


@pytest.fixture
def tiny(tiny_synthetic_model_dir, monkeypatch):
    return install_tiny_protocol(tiny_synthetic_model_dir, monkeypatch, samples=4096, seeds=1, tiers={"quick": 2048})


def bench(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--protocol", "tiny", "--arch", "batchtopk", "--json", *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]


def test_other_budgets_are_their_own_entries_and_every_json_line_has_a_kind(tiny, tmp_path, capsys):
    store = tmp_path / "results.sqlite"
    common = ["--store", str(store), "--out", str(tmp_path / "runs")]
    full = bench(capsys, *common)
    quick = bench(capsys, *common, "--tier", "quick", "--eval-samples", "1000")
    for got, samples in ((full, 4096), (quick, 2048)):
        assert [g["kind"] for g in got] == ["run", "summary"]
        assert got[0]["samples"] == samples and got[1]["samples"] == samples and got[1]["summary"] is True
    runs = ResultsStore(store, create=False).runs(status="complete")
    assert [r["config"]["run"]["eval_samples"] for r in runs] == [2000, 1000]
    board = ResultsStore(store, create=False).leaderboard("tiny")
    assert sorted((r["samples"], r["protocol_budget"], r["n_seeds"]) for r in board) == [
        (2048, False, 1),
        (4096, True, 1),
    ]
    # the later quick run of the same (arch, L0, seed) left the protocol entry as it was
    (protocol_row,) = [r for r in board if r["protocol_budget"]]
    assert protocol_row["f1_mean"] == pytest.approx(full[0]["f1"])
