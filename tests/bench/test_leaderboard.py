"""The one seed summary (bench/leaderboard.py): intervals, budgets as their own entries, and its users."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from scipy import stats

from saelab.bench import ResultsStore, export_leaderboard
from saelab.bench.leaderboard import leaderboard_rows, summarize_seeds, summary
from saelab.bench.runner import summarize


def env(run_samples, protocol_samples=6_000_000):
    config = {"protocol": {"name": "mini", "samples": protocol_samples}, "run": {"samples": run_samples}}
    return {"config": config, "config_hash": "h" * 16, "saelab_version": "0.1.0", "commit": "abc"}


def result(f1, mcc=0.7):
    return {"f1": f1, "mcc": mcc, "uniqueness": 0.9, "explained_variance": 0.8, "l0": 12.0, "dead_latents": 0}


def test_summary_has_the_t_interval_of_the_mean():
    values = [0.5, 0.6, 0.9]
    s = summary([{"f1": v} for v in values], metrics=("f1", "mcc"))
    se = statistics.stdev(values) / math.sqrt(3)
    half = stats.t.ppf(0.975, 2) * se
    assert s["n"] == 3 and s["f1_mean"] == pytest.approx(statistics.fmean(values))
    assert s["f1_sd"] == pytest.approx(statistics.stdev(values)) and s["f1_se"] == pytest.approx(se)
    assert s["f1_ci95_lo"] == pytest.approx(s["f1_mean"] - half) and s["f1_ci95_hi"] == pytest.approx(
        s["f1_mean"] + half
    )
    assert s["mcc_mean"] is None and s["mcc_ci95_lo"] is None  # missing everywhere: None throughout
    one = summary([{"f1": 0.4}], metrics=("f1",))
    assert one["f1_sd"] == 0.0 and one["f1_se"] is None and one["f1_ci95_lo"] is None and one["f1_ci95_hi"] is None


def test_runner_summary_is_the_leaderboard_summary_grouped_by_budget():
    records = [
        {"arch": "topk", "l0_target": 12.0, "seed": s, "samples": n, "f1": f1, "mcc": 0.7}
        for s, (n, f1) in enumerate([(1000, 0.5), (1000, 0.7), (2000, 0.9)])
    ]
    rows = summarize(records)
    assert [r["kind"] for r in rows] == ["summary", "summary"] and all(r["summary"] for r in rows)
    by_budget = {r["samples"]: r for r in rows}
    assert by_budget[1000]["n_seeds"] == 2 and by_budget[1000]["f1_mean"] == pytest.approx(0.6)
    assert by_budget[2000]["n_seeds"] == 1 and by_budget[2000]["f1_mean"] == pytest.approx(0.9)
    same = summarize_seeds(records, ("f1", "mcc"))
    assert by_budget[1000]["f1_ci95_hi"] == pytest.approx(next(r for r in same if r["samples"] == 1000)["f1_ci95_hi"])


def test_a_non_protocol_budget_is_its_own_entry_and_never_replaces_the_protocol_run(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    for seed, f1 in ((0, 0.80), (1, 0.82)):
        store.finish_run(store.start_run("mini", "recipe", 12, seed, env(6_000_000)), result(f1), 1.0)
    # later runs of the same (arch, L0, seed) on a quarter of the budget
    for seed, f1 in ((0, 0.60), (1, 0.64)):
        store.finish_run(store.start_run("mini", "recipe", 12, seed, env(1_500_000)), result(f1), 1.0)
    board = store.leaderboard("mini")
    assert len(board) == 2
    full, quick = board
    assert (full["samples"], full["protocol_budget"], full["n_seeds"]) == (6_000_000, True, 2)
    assert full["f1_mean"] == pytest.approx(0.81)  # the quick runs did not replace it
    assert (quick["samples"], quick["protocol_samples"], quick["protocol_budget"]) == (1_500_000, 6_000_000, False)
    assert quick["f1_mean"] == pytest.approx(0.62) and quick["f1_ci95_lo"] < 0.62 < quick["f1_ci95_hi"]
    assert leaderboard_rows(store.runs(status="complete"), "mini") == board

    export_leaderboard(board, tmp_path / "board.csv", "csv")
    rows = list(csv.DictReader((tmp_path / "board.csv").open()))
    assert [int(r["samples"]) for r in rows] == [6_000_000, 1_500_000]
    assert float(rows[0]["f1_ci95_lo"]) == pytest.approx(full["f1_ci95_lo"])
    export_leaderboard(board, tmp_path / "board.md", "md")
    md = (tmp_path / "board.md").read_text()
    assert "F1 95% CI" in md and "1.5M (protocol: 6M)" in md


def test_a_bf16_run_is_its_own_entry_and_never_replaces_the_fp32_run_of_its_seed(tmp_path, capsys, monkeypatch):
    # Bug: the leaderboard kept the latest run per (arch, L0, budget, seed), so a bf16 parity run replaced the
    # fp32 run of the same seed and the two precisions averaged into one row.
    from saelab.cli import main

    store = ResultsStore(tmp_path / "results.sqlite")
    for precision, f1s in (("fp32", (0.80, 0.82)), ("bf16", (0.70, 0.74))):
        for seed, f1 in enumerate(f1s):
            run_id = store.start_run("mini", "recipe", 12, seed, env(6_000_000))
            store.finish_run(run_id, {**result(f1), "compute_precision": precision}, 1.0)
    store.finish_run(store.start_run("mini", "recipe", 12, 0, env(6_000_000)), result(0.5), 1.0)  # unrecorded
    board = {r["compute_precision"]: r for r in store.leaderboard("mini", include_reference=False)}
    assert set(board) == {"fp32", "bf16", None}
    assert board["fp32"]["n_seeds"] == 2 and board["fp32"]["f1_mean"] == pytest.approx(0.81)
    assert board["bf16"]["n_seeds"] == 2 and board["bf16"]["f1_mean"] == pytest.approx(0.72)
    assert board[None]["n_seeds"] == 1 and board[None]["f1_mean"] == pytest.approx(0.5)
    records = [
        {"arch": "recipe", "l0_target": 12.0, "seed": 0, "f1": f, "compute_precision": p}
        for f, p in ((0.8, "fp32"), (0.7, "bf16"))
    ]
    assert {r["compute_precision"]: r["f1_mean"] for r in summarize_seeds(records, ("f1",))} == pytest.approx(
        {"fp32": 0.8, "bf16": 0.7}
    )
    export_leaderboard(list(board.values()), tmp_path / "board.csv", "csv")
    assert {r["compute_precision"] for r in csv.DictReader((tmp_path / "board.csv").open())} == {"fp32", "bf16", ""}
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--store", str(store.path), "leaderboard", "--no-reference"])
    assert exit_info.value.code == 0 and "precision" in capsys.readouterr().out


def test_results_leaderboard_shows_the_interval_and_the_budget(tmp_path, capsys, monkeypatch):
    from saelab.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # the table in full, not cut to 80 columns
    store = ResultsStore(tmp_path / "results.sqlite")
    for seed, f1 in ((0, 0.80), (1, 0.82), (2, 0.84)):
        store.finish_run(store.start_run("mini", "recipe", 12, seed, env(6_000_000)), result(f1), 1.0)
    store.finish_run(store.start_run("mini", "recipe", 12, 0, env(1_500_000)), result(0.6), 1.0)
    store.finish_run(store.start_run("mini", "recipe[ista_steps=0]", 12, 0, env(8192)), result(0.5), 1.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--store", str(store.path), "leaderboard", "--no-reference"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    best = store.leaderboard("mini", include_reference=False)[0]
    lo, hi = best["f1_ci95_lo"], best["f1_ci95_hi"]
    assert "95% CI" in text and f"[{lo:.4f}, {hi:.4f}]" in text
    assert "1.5M (protocol: 6M)" in text and "6M" in text
    assert "recipe[ista_steps=0]" in text and "8,192 (protocol: 6M)" in text  # a variant's name is not markup


def test_store_module_holds_only_the_store():
    import saelab.bench.store as store_module
    from saelab.bench import leaderboard

    for moved in ("export_runs", "export_leaderboard", "plot_f1_vs_l0", "format_summary"):
        assert not hasattr(store_module, moved), moved
    # report/data.py (owned elsewhere) still imports these two from the store module
    assert store_module.summary is leaderboard.summary and store_module.sort_leaderboard is leaderboard.sort_leaderboard
