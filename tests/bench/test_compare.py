"""`saelab compare` and bench/compare.py: paired deltas, verdicts, the store, budgets, errors and --max-minutes."""

from __future__ import annotations

import json
import statistics

import pytest

from saelab.bench.compare import Arm, comparison_rows
from tests.bench.conftest import run_cli


def rec(arch, seed, **metrics):
    return {"arch": arch, "seed": seed, **metrics}


def test_comparison_rows_pair_by_seed_and_give_verdicts():
    base, better, mixed = Arm("b", "b"), Arm("v1", "v1"), Arm("v2", "v2")
    records = []
    for seed, (fb, f1, f2) in enumerate([(0.50, 0.60, 0.55), (0.70, 0.81, 0.60), (0.40, 0.49, 0.52)]):
        records += [
            rec("b", seed, f1=fb, mcc=0.5, dead_latents=10, l0=12.0),
            rec("v1", seed, f1=f1, mcc=0.5 + 0.01 * seed, dead_latents=12 + seed, l0=11.0 + 0.1 * seed),
            rec("v2", seed, f1=f2, mcc=0.5, dead_latents=10, l0=12.0),
        ]
    rows = comparison_rows(
        records, base, [better, mixed], ["f1", "mcc", "dead_latents", "l0"], seeds_requested=[0, 1, 2]
    )
    r1, r2 = rows
    diffs = [0.10, 0.11, 0.09]
    assert r1["kind"] == "comparison" and r1["variant"] == "v1" and r1["base"] == "b" and r1["n_seeds"] == 3
    assert r1["delta_f1"] == pytest.approx(statistics.fmean(diffs))
    assert r1["se_f1"] == pytest.approx(statistics.stdev(diffs) / 3**0.5)
    assert r1["ci95_f1"][0] > 0 and r1["verdict"] == "better"
    assert r1["resolvable_f1"] == pytest.approx((r1["ci95_f1"][1] - r1["ci95_f1"][0]) / 2)
    assert r1["verdict_dead_latents"] == "worse"  # more dead latents, lower is better
    assert r1["verdict_l0"] in ("lower", "unresolved")  # L0 has no better side: only its direction is named
    assert r2["verdict"] == "unresolved" and r2["ci95_f1"][0] < 0 < r2["ci95_f1"][1]
    assert r2["verdict_mcc"] == "unresolved" and r2["se_mcc"] == 0.0
    assert not r1["partial"] and r1["seeds_finished"] == 3

    # seed 2 of the variant missing: two shared seeds, the result says it is partial
    partial = comparison_rows(
        [r for r in records if not (r["arch"] == "v1" and r["seed"] == 2)],
        base,
        [better],
        ["f1"],
        seeds_requested=[0, 1, 2],
    )[0]
    assert partial["n_seeds"] == 2 and partial["seeds"] == [0, 1] and partial["partial"]
    assert partial["delta_f1"] == pytest.approx(0.105)
    nothing = comparison_rows([], base, [better], ["f1", "mcc"], seeds_requested=[0, 1])[0]
    assert nothing["delta_f1"] is None and nothing["ci95_f1"] is None and nothing["verdict"] == "unresolved"
    assert nothing["seeds_finished"] == 0 and nothing["partial"]


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_compare_json_store_and_paired_deltas(tiny, tmp_path, capsys):
    """A built-in, an option override and a class from the user's own file, compared in one call."""
    store = tmp_path / "results.sqlite"
    user_file = tmp_path / "mine.py"
    user_file.write_text("from saelab.saes.topk import TopKSAE\n\n\nclass Mine(TopKSAE):\n    pass\n")
    code, out, err = run_cli(
        capsys,
        "compare",
        "batchtopk",
        "topk",
        "batchtopk:topk_threshold_lr=0.05",
        f"{user_file}:Mine",
        "--protocol",
        "tiny",
        "--tier",
        "quick",
        "--seeds",
        "2",
        "--metric",
        "explained_variance",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "runs"),
        "--json",
    )
    assert code == 0, err
    got = lines(out)
    assert [g["kind"] for g in got] == ["estimate", "comparison", "comparison", "comparison"]
    est = got[0]
    assert est["seconds"] > 0 and est["steps"] == 4096 // 256 and est["rounds"] == 2 and "timed" in est["basis"]
    topk, override, mine = got[1:]
    assert mine["variant"] == f"{user_file}:Mine" and mine["n_seeds"] == 2
    assert (topk["variant"], override["variant"]) == ("topk", "batchtopk:topk_threshold_lr=0.05")
    assert override["arch"] == "batchtopk[topk_threshold_lr=0.05]" and override["overrides"] == {
        "topk_threshold_lr": 0.05
    }
    for row in (topk, override):
        for key in (
            "delta_f1",
            "se_f1",
            "ci95_f1",
            "verdict",
            "n_seeds",
            "delta_mcc",
            "se_mcc",
            "ci95_mcc",
            "verdict_mcc",
            "resolvable_f1",
            "delta_explained_variance",
            "verdict_explained_variance",
        ):
            assert key in row, key
        assert row["base"] == "batchtopk" and row["n_seeds"] == 2 and row["samples"] == 4096
        assert row["tier"] == "quick" and row["partial"] is False and len(row["ci95_f1"]) == 2
        assert row["verdict"] in ("better", "worse", "unresolved")

    # every run is in the store; the deltas are the paired differences of the stored F1s
    from saelab.bench.store import ResultsStore

    runs = ResultsStore(store, create=False).runs(protocol="tiny", status="complete")
    assert len(runs) == 8
    assert {"batchtopk", "topk", "batchtopk[topk_threshold_lr=0.05]"} < {r["arch"] for r in runs}
    f1 = {(r["arch"], r["seed"]): r["f1"] for r in runs}
    expected = statistics.fmean(f1[(override["arch"], s)] - f1[("batchtopk", s)] for s in (0, 1))
    assert override["delta_f1"] == pytest.approx(expected)
    assert all(r["config"]["run"]["samples"] == 4096 for r in runs)


@pytest.mark.parametrize(
    "args, field",
    [
        (["batchtopk", "nope"], "arch='nope'"),
        (["batchtopk", "batchtopk:not_a_field=1"], "variant='batchtopk:not_a_field=1'"),
        (["batchtopk", "batchtopk"], "variant='batchtopk'"),
        (["batchtopk", "topk", "--tier", "quick", "--samples", "8k"], "tier='quick'"),
        (["batchtopk", "topk", "--tier", "huge"], "tier='huge'"),
        (["batchtopk", "topk", "--metric", "nonsense"], "metric='nonsense'"),
        (["batchtopk", "topk", "--l0", "2", "3"], "l0="),
        (["batchtopk", "topk", "--max-minutes", "0"], "max_minutes=0"),
    ],
)
def test_bad_options_fail_in_one_line_before_training(tiny, tmp_path, capsys, args, field):
    code, out, err = run_cli(
        capsys,
        "compare",
        *args,
        "--protocol",
        "tiny",
        "--seeds",
        "2",
        "--store",
        str(tmp_path / "s.sqlite"),
        "--out",
        str(tmp_path / "runs"),
        "--json",
    )
    assert code == 2 and err.startswith(f"error: {field}") and len(err.strip().splitlines()) == 1, err
    assert out == "" and not (tmp_path / "runs").exists() and not (tmp_path / "s.sqlite").exists()


def test_max_minutes_stops_cleanly_and_marks_the_result_partial(tiny, tmp_path, capsys):
    # A budget far below one seed's time: the workers are stopped, nothing finished, the result says so.
    code, out, err = run_cli(
        capsys,
        "compare",
        "batchtopk",
        "topk",
        "--protocol",
        "tiny",
        "--seeds",
        "2",
        "--max-minutes",
        "0.005",
        "--no-estimate",
        "--no-store",
        "--out",
        str(tmp_path / "runs"),
        "--json",
    )
    assert code == 0, err
    (row,) = lines(out)
    assert row["partial"] is True and row["seeds_finished"] == 0 and row["seeds_requested"] == 2
    assert row["n_seeds"] == 0 and row["delta_f1"] is None and row["verdict"] == "unresolved"
