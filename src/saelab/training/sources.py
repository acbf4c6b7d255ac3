"""Activation sources: anything that hands the trainer batches and can save its position.

The trainer never knows where batches come from; synthetic models, cached activations and live
language models all implement this small protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from saelab.errors import ConfigError


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next [batch_size, d_in] activations."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Enough to resume the stream exactly where it is."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorSource:
    """Cycles through a fixed [N, D] tensor in order (tests, small in-memory datasets)."""

    def __init__(self, data_ND: torch.Tensor):
        if data_ND.ndim != 2 or data_ND.shape[0] == 0:
            raise ConfigError("data", tuple(data_ND.shape), "must be a non-empty [N, D] tensor")
        self.data_ND = data_ND
        self.d_in = data_ND.shape[1]
        self.position = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        n = self.data_ND.shape[0]
        idx = (torch.arange(batch_size) + self.position) % n
        self.position = (self.position + batch_size) % n
        return self.data_ND[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class SyntheticSource:
    """Fresh samples from a synthetic model every step; the model's generator state is the position.

    Evaluations seed and restore that generator themselves, so they never shift the training stream."""

    def __init__(self, model: Any, seed: int = 0, device: str | torch.device = "cpu"):
        self.model = model
        self.d_in = int(model.hidden_dim)
        model.manual_seed(int(seed))

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.model.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.model.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.generator.set_state(state["generator"])
