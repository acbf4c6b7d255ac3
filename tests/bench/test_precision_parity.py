"""`benchmarks/bench_precision_parity.py`: bf16 runs paired with the fp32 run of the same seed."""

import importlib.util
from pathlib import Path

import pytest

from saelab.bench import ResultsStore

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_precision_parity.py"
_spec = importlib.util.spec_from_file_location("bench_precision_parity", _PATH)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


def _env(samples):
    config = {"protocol": {"name": "mini", "samples": 6_000_000}, "run": {"samples": samples}}
    return {"config": config, "config_hash": "h" * 16, "saelab_version": "0.1.0", "commit": "abc"}


def _record(store, arch, seed, precision, f1, samples=6_000_000, mcc=0.7):
    run_id = store.start_run("mini", arch, 12, seed, _env(samples))
    metrics = {"f1": f1, "mcc": mcc, "l0": 12.0, "dead_latents": 0}
    if precision is not None:
        metrics["compute_precision"] = precision
    store.finish_run(run_id, metrics, 1.0)


def test_pairs_by_seed_and_flags_a_difference_beyond_two_standard_errors(tmp_path):
    store = ResultsStore(tmp_path / "parity.sqlite")
    fp32 = {0: 0.80, 1: 0.84, 2: 0.82}
    for seed, f1 in fp32.items():
        _record(store, "matryoshka", seed, "fp32", f1)
        _record(store, "matryoshka", seed, "bf16", f1 + (0.001, -0.002, 0.0015)[seed])  # noise around 0
        _record(store, "batchtopk", seed, "fp32", f1)
        _record(store, "batchtopk", seed, "bf16", f1 - 0.05 + 0.001 * seed)  # a systematic drop
    _record(store, "matryoshka", 0, "fp32", 0.5, samples=1_500_000)  # another budget: not paired
    _record(store, "matryoshka", 1, None, 0.1)  # precision not recorded: not paired
    _record(store, "standard", 0, "fp32", 0.55)  # no bf16 run: no row
    rows = {r["arch"]: r for r in parity.parity_rows(store.runs(status="complete"), 6_000_000)}
    assert set(rows) == {"matryoshka", "batchtopk"}
    m, b = rows["matryoshka"], rows["batchtopk"]
    assert m["delta_f1"]["n_seeds"] == 3 and m["delta_f1"]["delta"] == pytest.approx(0.0005 / 3)
    assert m["f1_fp32"][0] == pytest.approx(0.82) and m["within_2se"] is True
    assert b["delta_f1"]["delta"] == pytest.approx(-0.049) and b["within_2se"] is False
    assert b["delta_f1"]["verdict"] == "worse" and b["delta_mcc"]["delta"] == pytest.approx(0.0)


def test_the_latest_run_of_a_seed_counts_and_one_seed_has_no_verdict(tmp_path):
    store = ResultsStore(tmp_path / "parity.sqlite")
    _record(store, "recipe", 0, "fp32", 0.90)
    _record(store, "recipe", 0, "bf16", 0.10)
    _record(store, "recipe", 0, "bf16", 0.91)  # a rerun replaces the earlier bf16 run of seed 0
    (row,) = parity.parity_rows(store.runs(status="complete"))
    assert row["delta_f1"]["delta"] == pytest.approx(0.01) and row["delta_f1"]["se"] is None
    assert row["within_2se"] is None
