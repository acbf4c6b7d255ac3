"""Sampling from a seeded side stream, leaving the main stream where it was.

Evaluations and statistics draw reproducible samples (fixed seed) from a model that is also
feeding a training run; reseeding its generator outright would change what training sees next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


@contextlib.contextmanager
def forked_generator(generator: torch.Generator, seed: int) -> Iterator[torch.Generator]:
    """Reseed `generator` with `seed` for the block, then put its state back: the block draws the
    stream `seed` gives and the owner's stream continues afterwards exactly where it was."""
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield generator
    finally:
        generator.set_state(saved)


@contextlib.contextmanager
def seeded_sampling(model: Any, seed: int, cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """Reproducible sampling from any model-like object for the block.

    Seeds the global torch RNG (forked: CPU and `cuda_devices` get their state back) for models
    that sample from it, and the model's own `generator`, if it has a torch.Generator there (as
    `SyntheticModel` does), through `forked_generator`."""
    generator = getattr(model, "generator", None)
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.manual_seed(seed)
        if not isinstance(generator, torch.Generator):
            yield
            return
        with forked_generator(generator, seed):
            yield
