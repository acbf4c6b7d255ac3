"""In-memory and synthetic sources (the file, cache and LM sources live in `saelab.activations`)."""

from __future__ import annotations

from typing import Any

import torch

from saelab.data.protocol import ActivationSource, is_paired
from saelab.errors import ConfigError


class TensorSource:
    """Cycles through a fixed [N, D] tensor in order (tests, small in-memory datasets).

    With `target_NE` it is a paired source: `next_pair` gives the matching rows of both."""

    def __init__(self, data_ND: torch.Tensor, target_NE: torch.Tensor | None = None):
        if data_ND.ndim != 2 or data_ND.shape[0] == 0:
            raise ConfigError("data", tuple(data_ND.shape), "must be a non-empty [N, D] tensor")
        if target_NE is not None and (target_NE.ndim != 2 or target_NE.shape[0] != data_ND.shape[0]):
            raise ConfigError("target", tuple(target_NE.shape), f"must be a [{data_ND.shape[0]}, d_out] tensor")
        self.data_ND = data_ND
        self.target_NE = target_NE
        self.d_in = data_ND.shape[1]
        if target_NE is not None:
            self.d_out = target_NE.shape[1]
        self.position = 0

    def _rows(self, batch_size: int) -> torch.Tensor:
        n = self.data_ND.shape[0]
        idx = (torch.arange(batch_size) + self.position) % n
        self.position = (self.position + batch_size) % n
        return idx.to(self.data_ND.device)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.data_ND[self._rows(batch_size)]

    def next_pair(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.target_NE is None:
            raise ConfigError("data", "TensorSource", "has no targets; pass target_NE for paired batches")
        idx = self._rows(batch_size)
        return self.data_ND[idx], self.target_NE[idx.to(self.target_NE.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class SyntheticSource:
    """Fresh samples from a synthetic model every step; the model's generator state is the position.

    Evaluations sample from `model.forked(seed)`, so they never shift the training stream."""

    def __init__(self, model: Any, seed: int = 0):
        self.model = model
        self.d_in = int(model.hidden_dim)
        model.manual_seed(int(seed))

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.model.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.model.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.generator.set_state(state["generator"])


def synthetic_stream(model: Any, seed: int) -> ActivationSource:
    """The training stream of a ground-truth model, started at `seed`: a `SyntheticSource`, or for a
    transcoder world the world itself (a paired source: `next_batch` gives inputs, `next_pair` pairs)."""
    if is_paired(model):
        model.manual_seed(int(seed))
        return model
    return SyntheticSource(model, seed=seed)
