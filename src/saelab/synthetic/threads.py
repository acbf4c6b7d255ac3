"""Scoped control of torch's intra-op thread count.

Sampling is many small and medium tensor ops: a second intra-op thread mostly adds barrier
synchronisation. On this project's 2-vCPU machines (which behave like one physical core for
FMA work) two threads made saelab's synth-16k sampling ~2x *slower* and big GEMMs no faster, so
the sampler defaults to one thread on CPU (`SyntheticModel.sample_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily run torch intra-op work on `num_threads` threads (None: leave as is)."""
    old = torch.get_num_threads()
    if num_threads is None or num_threads == old:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
