"""The live-LM activation source: a hooked LM run over a corpus, through a shuffling buffer.

It implements `saelab.data.ActivationSource` (rows of files and caches: `activations/files.py`).
Under torch.distributed each rank reads every world_size-th document.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from saelab.activations.buffer import ShuffleBuffer
from saelab.activations.hooked_lm import HookedLM
from saelab.activations.text import ContextStream
from saelab.errors import ConfigError, require


class LMActivationSource:
    """Activations of a hooked LM on a corpus, through a shuffling buffer of `buffer_size` rows."""

    def __init__(
        self,
        hooked: HookedLM,
        contexts: ContextStream,
        model_batch_size: int = 8,
        buffer_size: int = 16384,
        seed: int = 0,
    ):
        require(
            isinstance(model_batch_size, int) and model_batch_size > 0,
            "model_batch_size",
            model_batch_size,
            "must be a positive integer",
        )
        self.hooked = hooked
        self.contexts = contexts
        self.model_batch_size = model_batch_size
        self.d_in = hooked.d_in
        self.timings = {"tokenise": 0.0, "forward": 0.0}
        self.tokens = 0
        self.buffer = ShuffleBuffer(self._fill, self.d_in, buffer_size, seed=seed)

    def _fill(self) -> torch.Tensor:
        for _ in range(100):  # a batch of only special tokens gives no rows; try the next one
            t0 = time.perf_counter()
            batch = self.contexts.next_batch(self.model_batch_size)
            t1 = time.perf_counter()
            acts_ND = self.hooked.activations(batch.input_ids_BS, batch.attention_mask_BS).float().cpu()
            self.timings["tokenise"] += t1 - t0
            self.timings["forward"] += time.perf_counter() - t1
            self.tokens += acts_ND.shape[0]
            if acts_ND.shape[0]:
                return acts_ND
        raise ConfigError("dataset", f"{len(self.contexts)} documents", "yields no non-special tokens")

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.buffer.take(batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"contexts": self.contexts.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contexts.load_state_dict(state["contexts"])
        self.buffer.load_state_dict(state["buffer"])
