"""Fixtures for the report tests: a tiny hierarchical synthetic model, a real training run on it (two
architectures × three L0s) and a real bench store (two seeds), all built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from saelab.synthetic import (
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    save_synthetic_model,
)


@pytest.fixture(scope="session")
def report_model_dir(tmp_path_factory) -> Path:
    cfg = SyntheticModelConfig(
        num_features=96,
        hidden_dim=24,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.01),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2, mutually_exclusive_portion=1.0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=None,
        correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=2.0, end=1.0),
        std_firing_magnitudes=0.1,
        bias=0.2,
        seed=3,
    )
    path = tmp_path_factory.mktemp("report-model") / "tiny"
    save_synthetic_model(SyntheticModel(cfg), str(path))
    return path


@pytest.fixture(scope="session")
def report_run_dir(report_model_dir, tmp_path_factory) -> Path:
    from saelab.training.run import RunConfig, run_training

    cfg = RunConfig(data=str(report_model_dir), arch=["batchtopk", "matryoshka"], l0=[2, 3, 4], width=32,
                    samples=40_000, batch_size=256, lr=3e-3, eval_samples=8_000)
    run_dir = tmp_path_factory.mktemp("report-run") / "run"
    run_training(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def report_store(report_model_dir, tmp_path_factory) -> Path:
    from saelab.bench.protocols import Protocol
    from saelab.bench.runner import BenchRequest, run_bench
    from saelab.bench.store import ResultsStore

    proto = Protocol(name="tiny", data=str(report_model_dir), width=32, samples=30_000, batch_size=256, lr=3e-3,
                     l0_sweep=(2, 4), natural_l0=3, seeds=2, eval_samples=4_000, lr_decay_fraction=1 / 3)
    root = tmp_path_factory.mktemp("report-bench")
    store = ResultsStore(root / "results.sqlite")
    run_bench(BenchRequest(protocol=proto, archs=["batchtopk", "matryoshka"], l0s=[2, 4], seeds=[0, 1],
                           out_dir=root / "bench"), store=store, progress=False)
    return store.path
