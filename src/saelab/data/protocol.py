"""The one interface between data and the trainer: a stream of batches that can save its position.

Synthetic models, activation files, caches and live language models all implement it, so the
trainer never knows where batches come from. A source with a target (a transcoder's MLP output,
say) also implements `next_pair`; the trainer asks for pairs only when an SAE needs them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next [batch_size, d_in] activations."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Enough to resume the stream exactly where it is (tensors and JSON-able values only)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class PairedSource(ActivationSource, Protocol):
    """A source of (input, target) rows: e.g. an MLP's input and output, for transcoders."""

    d_out: int

    def next_pair(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ([batch_size, d_in] inputs, [batch_size, d_out] targets), row-aligned."""
        ...


def is_paired(source: Any) -> bool:
    return isinstance(source, PairedSource)
