"""Shared fixtures: the shipped corpus and tiny random causal LMs saved as local model folders."""

from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text().splitlines() if line.strip()]


def _build(tmp_path_factory, arch: str) -> Path:
    pytest.importorskip("transformers")
    from saelab.activations.tiny import build_tiny_causal_lm

    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    return build_tiny_causal_lm(
        tmp_path_factory.mktemp(f"tiny_{arch}") / "model",
        lines,
        arch=arch,
        d_model=32,
        n_layers=3,
        context_size=64,
        seed=0,
    )


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_trained(tmp_path_factory) -> Path:
    """A tiny GPT-2 fitted to the corpus for 60 steps, so deleting a layer's MLP costs loss (a random
    model's MLPs barely move it, which leaves CE recovered a ratio of noise). Built on one thread:
    on a busy 2-core machine intra-op threads make these small steps ten times slower."""
    pytest.importorskip("transformers")
    import torch

    from saelab.activations.tiny import build_tiny_causal_lm

    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_causal_lm(
            tmp_path_factory.mktemp("tiny_gpt2_trained") / "model",
            lines,
            arch="gpt2",
            d_model=32,
            n_layers=3,
            context_size=64,
            seed=0,
            train_steps=60,
        )
    finally:
        torch.set_num_threads(threads)
