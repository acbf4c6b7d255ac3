"""The live-LM activation source: a hooked LM run over a corpus, through a shuffling buffer.

It implements `saelab.data.ActivationSource` (rows of files and caches: `activations/files.py`).
Under torch.distributed each rank reads every world_size-th document.

With a paired HookedLM (an output hook, for transcoders) each row is an input and its target side
by side, [x | y] of width d_in + d_out, so one shuffle (and one prefetch thread) moves both;
`PairedRows` splits them again into the paired-source protocol's `next_pair`.
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
        # The row width: a paired LM's rows are [x | y] (PairedRows gives them as pairs).
        self.d_in = hooked.d_in + (hooked.d_out or 0)
        self.timings = {"tokenise": 0.0, "forward": 0.0}
        self.tokens = 0
        self.buffer = ShuffleBuffer(self._fill, self.d_in, buffer_size, seed=seed)

    def _fill(self) -> torch.Tensor:
        for _ in range(100):  # a batch of only special tokens gives no rows; try the next one
            t0 = time.perf_counter()
            batch = self.contexts.next_batch(self.model_batch_size)
            t1 = time.perf_counter()
            if self.hooked.paired:
                x_ND, y_NE = self.hooked.paired_activations(batch.input_ids_BS, batch.attention_mask_BS)
                acts_ND = torch.cat([x_ND.float(), y_NE.float()], dim=1).cpu()
            else:
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


class PairedRows:
    """A paired source over a source of [x | y] rows: `next_pair` splits each batch at column d_in.

    `next_batch` gives the inputs alone (the trainer's norm estimate reads those). The position is
    the inner source's, so a checkpoint resumes exactly as the inner source does."""

    def __init__(self, source: Any, d_in: int, d_out: int):
        require(
            source.d_in == d_in + d_out,
            "d_out",
            d_out,
            f"rows of width {source.d_in} cannot split into {d_in} + {d_out}",
        )
        self.source, self.d_in, self.d_out = source, d_in, d_out

    def next_pair(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows_BW = self.source.next_batch(batch_size)
        return rows_BW[:, : self.d_in], rows_BW[:, self.d_in :]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.next_pair(batch_size)[0]

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
