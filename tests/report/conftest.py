"""Fixtures for the report tests: a tiny hierarchical synthetic model, a real training run on it (two
architectures × three L0s) and a real bench store (two seeds), all built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def report_model_dir(tiny_synthetic_model_dir) -> Path:
    return tiny_synthetic_model_dir


@pytest.fixture(scope="session")
def report_run_dir(report_model_dir, tmp_path_factory) -> Path:
    from saelab.runs import RunConfig, run_training

    cfg = RunConfig(
        data=str(report_model_dir),
        arch=["batchtopk", "matryoshka"],
        l0=[2, 3, 4],
        width=32,
        samples=40_000,
        batch_size=256,
        lr=3e-3,
        eval_samples=8_000,
    )
    run_dir = tmp_path_factory.mktemp("report-run") / "run"
    run_training(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def report_store(report_model_dir, tmp_path_factory) -> Path:
    from saelab.bench.protocols import Protocol
    from saelab.bench.runner import BenchRequest, run_bench
    from saelab.bench.store import ResultsStore

    proto = Protocol(
        name="tiny",
        data=str(report_model_dir),
        width=32,
        samples=30_000,
        batch_size=256,
        lr=3e-3,
        l0_sweep=(2, 4),
        natural_l0=3,
        seeds=2,
        eval_samples=4_000,
        lr_decay_fraction=1 / 3,
    )
    root = tmp_path_factory.mktemp("report-bench")
    store = ResultsStore(root / "results.sqlite")
    run_bench(
        BenchRequest(
            protocol=proto, archs=["batchtopk", "matryoshka"], l0s=[2, 4], seeds=[0, 1], out_dir=root / "bench"
        ),
        store=store,
        progress=False,
    )
    return store.path
