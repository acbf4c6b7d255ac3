"""Session fixtures for the synthetic-model tests (builders live in synth_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from saelab.synthetic import SyntheticModel, build_preset


@pytest.fixture(scope="session")
def mini_model() -> SyntheticModel:
    return build_preset("synth-mini")


@pytest.fixture(scope="session")
def sbw_model() -> SyntheticModel:
    return build_preset("sbw-toy")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    # These tests run many small tensor ops, where a second intra-op thread only adds
    # synchronisation (and on an oversubscribed 2-core box can make them 100x slower).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
