"""Where diagnostics get their data: `DataHandle`, a thin view of `saelab.data.open_data` with what
a sweep needs: a fresh training stream per seed, a held-out batch, and the ground truth if any.

A spec is a preset or synthetic-model folder, an activation file (.npy, .safetensors, .pt/.pth:
see `saelab.activations.files`) or a `saelab cache` folder. File and cache rows are read whole;
the last tenth (at most `max_eval_rows`) is kept out of training for evaluation, and each seed's
stream visits the training rows in its own random order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from saelab.data import DataSpec, SyntheticSource, TensorSource, open_data
from saelab.errors import require
from saelab.seeding import seeded_sampling


@torch.no_grad()
def sample_model(model: Any, n: int, seed: int, with_features: bool = False) -> Any:
    """n samples from a separate stream (seeded), leaving the model's own stream where it was."""
    with seeded_sampling(model, seed):
        if with_features:
            return model.sample_with_features(n)
        return model.sample(n)


@dataclass
class DataHandle:
    """What a diagnostic needs from its data."""

    spec: str
    d_in: int
    model: Any | None  # the synthetic model (ground truth) or None for plain activations
    make_source: Callable[[int], Any]  # seed -> ActivationSource for training
    eval_batch: Callable[[int, int], torch.Tensor]  # (n, seed) -> held-out [n, d_in]

    @property
    def is_synthetic(self) -> bool:
        return self.model is not None


def resolve_data(spec: str, device: str = "cpu", eval_fraction: float = 0.1, max_eval_rows: int = 16384) -> DataHandle:
    """A preset name, a synthetic-model folder, an activation file or a cache folder."""
    require(
        isinstance(spec, str) and spec.strip() != "",
        "data",
        spec,
        "name a preset, a model folder or an activation file",
    )
    opened = open_data(DataSpec(data=spec), device=device)
    model = opened.ground_truth
    if model is not None:
        return DataHandle(
            spec=spec,
            d_in=opened.d_in,
            model=model,
            make_source=lambda seed: SyntheticSource(model, seed),
            eval_batch=lambda n, seed: sample_model(model, n, seed),
        )
    rows = opened.source
    acts_ND = rows.read_rows(rows.start, rows.stop).float().to(device)  # type: ignore[attr-defined]
    require(acts_ND.shape[0] >= 2, "data", spec, f"holds {acts_ND.shape[0]} row(s); a diagnostic needs at least 2")
    require(bool(torch.isfinite(acts_ND).all()), "data", spec, "activations contain NaN or inf")
    n_eval = max(1, min(max_eval_rows, int(acts_ND.shape[0] * eval_fraction)))
    train_ND, eval_ND = acts_ND[:-n_eval], acts_ND[-n_eval:]

    def make_source(seed: int) -> Any:
        g = torch.Generator().manual_seed(int(seed))
        return TensorSource(train_ND[torch.randperm(train_ND.shape[0], generator=g).to(train_ND.device)])

    return DataHandle(
        spec=spec,
        d_in=int(acts_ND.shape[1]),
        model=None,
        make_source=make_source,
        eval_batch=lambda n, seed: eval_ND[:n],
    )


def lm_data_handle(
    model: str,
    dataset: str,
    layer: int | None = None,
    hook_module: str | None = None,
    context_size: int = 128,
    text_column: str = "text",
    model_batch_size: int = 8,
    buffer_size: int = 16384,
    device: str = "cpu",
) -> DataHandle:
    """A hooked local LM on a corpus: training rows from its training documents, evaluation rows
    from the held-out ones (see saelab.activations)."""
    spec = DataSpec(
        model=model,
        layer=layer,
        hook_module=hook_module,
        dataset=dataset,
        text_column=text_column,
        context_size=context_size,
        model_batch_size=model_batch_size,
        buffer_size=buffer_size,
        prefetch=False,
    )
    first = open_data(spec, device=device)
    hooked = first.hooked
    assert hooked is not None  # spec names a model

    def make_source(seed: int) -> Any:
        return open_data(spec, device=device, seed=seed, hooked=hooked).source

    return DataHandle(
        spec=f"{model}:{hooked.hook_module}",
        d_in=first.d_in,
        model=None,
        make_source=make_source,
        eval_batch=lambda n, seed: first.eval_batch(n, seed),
    )
