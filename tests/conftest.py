"""Fixtures shared across test folders."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

# A suite started in the background of a non-interactive shell inherits SIGINT *ignored* (POSIX), and the trainer
# leaves an ignored signal alone, so the Ctrl-C tests would see nothing. Catching it here also gives every process
# the tests start the default disposition (a caught signal resets to default across exec; an ignored one does not).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a module of many small tensor ops: on a busy 2-core machine a second thread
    only adds synchronisation (and oversubscribed, can make them 100x slower)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_plain_imported_architectures(monkeypatch):
    """Drop (for this test) architectures an earlier test registered by importing a user's file as a plain module
    (`import tanh_sae`): the CLI imports the same file under its own module name, which would clash by name."""
    from saelab.saes.registry import SAE_REGISTRY

    for name, cls in list(SAE_REGISTRY.items()):
        if not cls.__module__.startswith("saelab"):  # saelab.* built-ins and saelab_user_arch_* CLI imports stay
            monkeypatch.delitem(SAE_REGISTRY, name)


@pytest.fixture(scope="session")
def tiny_synthetic_model_dir(tmp_path_factory) -> Path:
    """A saved 96-feature, 24-dim hierarchical synthetic model: big enough to train and score in seconds."""
    from saelab.synthetic import (
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
        save_synthetic_model,
    )

    cfg = SyntheticModelConfig(
        num_features=96,
        hidden_dim=24,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.01),
        hierarchy=HierarchyConfig(
            total_root_nodes=4,
            branching_factor=3,
            max_depth=2,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=None,
        correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=2.0, end=1.0),
        std_firing_magnitudes=0.1,
        bias=0.2,
        seed=3,
    )
    path = tmp_path_factory.mktemp("tiny-model") / "tiny"
    save_synthetic_model(SyntheticModel(cfg), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_transcoder_world_dir(tmp_path_factory) -> Path:
    """A saved small transcoder world (512 inputs in 16 dims, d_out 32; `tests/training/transcoder_worlds.py`)."""
    from saelab.synthetic import save_transcoder_world
    from tests.training.transcoder_worlds import small_world

    path = tmp_path_factory.mktemp("tiny-transcoder-world") / "world"
    save_transcoder_world(small_world(), str(path))
    return path
