"""Session fixtures for the synthetic-model tests (builders live in synth_helpers.py)."""

from __future__ import annotations

import pytest

from saelab.synthetic import SyntheticModel, build_preset


@pytest.fixture(scope="session")
def mini_model() -> SyntheticModel:
    return build_preset("synth-mini")


@pytest.fixture(scope="session")
def sbw_model() -> SyntheticModel:
    return build_preset("sbw-toy")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(single_torch_thread):
    """Every synthetic test module runs its many small tensor ops on one thread (see tests/conftest.py)."""
