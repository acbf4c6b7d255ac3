"""Where diagnostics get their data: a synthetic model (preset or folder) or a file of activations.

`resolve_data(spec)` gives a `DataHandle`: an activation source for training, a function for a
held-out evaluation batch, and the ground-truth model when there is one. Activation files hold one
[N, d_in] tensor (`.pt`/`.pth`: a tensor or a dict with a single tensor or an `activations` key;
`.npy`; `.safetensors`: a single tensor or an `activations` key). The last rows of a file are kept
out of training for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.errors import FileFormatError, require

ACTIVATION_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


class ModelStream:
    """An activation source over a synthetic model: `next_batch(B)` = `model.sample(B)`, seeded.

    The stream's position is the model generator's state, so checkpoints resume it exactly."""

    def __init__(self, model: Any, seed: int = 0):
        self.model = model
        self.d_in = int(model.hidden_dim)
        gen = getattr(model, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(int(seed))
        elif hasattr(model, "manual_seed"):
            model.manual_seed(int(seed))

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.model.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        gen = getattr(self.model, "generator", None)
        return {"generator": gen.get_state()} if isinstance(gen, torch.Generator) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen = getattr(self.model, "generator", None)
        if isinstance(gen, torch.Generator) and "generator" in state:
            gen.set_state(state["generator"])


@torch.no_grad()
def sample_model(model: Any, n: int, seed: int, with_features: bool = False) -> Any:
    """n samples from a separate stream (seeded), leaving the model's own stream where it was."""
    gen = getattr(model, "generator", None)
    saved = gen.get_state() if isinstance(gen, torch.Generator) else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if saved is not None:
            gen.manual_seed(seed)
        try:
            if with_features:
                return model.sample_with_features(n)
            return model.sample(n)
        finally:
            if saved is not None:
                gen.set_state(saved)


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


def load_activations(path: str | Path) -> torch.Tensor:
    """Read a [N, d_in] activation tensor from .pt/.pth/.npy/.safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"activation file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np

            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            raise FileFormatError(f"{path}: unknown activation file type; use one of {', '.join(ACTIVATION_SUFFIXES)}")
    except FileFormatError:
        raise
    except Exception as err:  # truncated / foreign files
        raise FileFormatError(f"{path} cannot be read as activations: {err}") from None
    if isinstance(obj, dict):
        if "activations" in obj:
            obj = obj["activations"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise FileFormatError(f"{path} holds several tensors ({', '.join(map(str, obj))}); name one 'activations'")
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or obj.shape[0] < 2 or obj.shape[1] < 1:
        raise FileFormatError(f"{path} must hold one [N, d_in] tensor with N ≥ 2, got {tuple(getattr(obj, 'shape', ()))}")
    if not obj.dtype.is_floating_point:
        raise FileFormatError(f"{path}: activations must be floating point, got {obj.dtype}")
    obj = obj.float()
    if not torch.isfinite(obj).all():
        raise FileFormatError(f"{path}: activations contain NaN or inf")
    return obj


def load_synthetic_model(spec: str, device: str = "cpu") -> Any:
    """A synthetic model from a preset name or a saved model folder."""
    from saelab.synthetic import load_source

    return load_source(spec, device=device)


def resolve_data(spec: str, device: str = "cpu", eval_fraction: float = 0.1, max_eval_rows: int = 16384) -> DataHandle:
    """A preset name, a synthetic-model folder, or an activation file."""
    require(isinstance(spec, str) and spec.strip() != "", "data", spec, "name a preset, a model folder or an activation file")
    path = Path(spec).expanduser()
    is_cache = path.is_dir() and (path / "manifest.json").is_file()
    if is_cache or path.is_file() or path.suffix.lower() in ACTIVATION_SUFFIXES:
        if is_cache:  # an activation cache written by `saelab cache`: all its rows
            from saelab.activations.cache import open_cache
            from saelab.activations.sources import RowFileSource

            rows = RowFileSource(open_cache(path)[1], rank=0, world_size=1)
            acts_ND = rows.read_rows(rows.start, rows.stop).to(device)
        else:
            acts_ND = load_activations(path).to(device)
        n_eval = max(1, min(max_eval_rows, int(acts_ND.shape[0] * eval_fraction)))
        train_ND, eval_ND = acts_ND[:-n_eval], acts_ND[-n_eval:]

        def make_source(seed: int) -> Any:
            from saelab.training.sources import TensorSource

            g = torch.Generator().manual_seed(int(seed))
            return TensorSource(train_ND[torch.randperm(train_ND.shape[0], generator=g).to(train_ND.device)])

        def eval_batch(n: int, seed: int) -> torch.Tensor:
            return eval_ND[:n]

        return DataHandle(spec=spec, d_in=int(acts_ND.shape[1]), model=None, make_source=make_source,
                          eval_batch=eval_batch)
    model = load_synthetic_model(spec, device=device)
    return DataHandle(
        spec=spec,
        d_in=int(model.hidden_dim),
        model=model,
        make_source=lambda seed: ModelStream(model, seed),
        eval_batch=lambda n, seed: sample_model(model, n, seed),
    )


def lm_data_handle(model: str, dataset: str, layer: int | None = None, hook_module: str | None = None,
                   context_size: int = 128, text_column: str = "text", model_batch_size: int = 8,
                   buffer_size: int = 16384, device: str = "cpu") -> DataHandle:
    """A hooked local LM on a corpus: training rows from its training documents, evaluation rows
    from the held-out ones (see saelab.activations)."""
    from saelab.activations import build_lm_source
    from saelab.activations.hooked_lm import HookedLM
    from saelab.training.run import RunConfig

    def cfg(seed: int) -> RunConfig:
        return RunConfig(model=model, layer=layer, hook_module=hook_module, dataset=dataset, text_column=text_column,
                         context_size=context_size, model_batch_size=model_batch_size, buffer_size=buffer_size,
                         device=device, seed=seed)

    hooked = HookedLM.from_pretrained(model, layer=layer, hook_module=hook_module, device=device)

    def eval_batch(n: int, seed: int) -> torch.Tensor:
        held_out = build_lm_source(cfg(seed), hooked, split="eval")
        rows, count = [], 0
        for batch in held_out.contexts.iter_once(model_batch_size):
            acts_ND = hooked.activations(batch.input_ids_BS, batch.attention_mask_BS).float()
            rows.append(acts_ND)
            count += acts_ND.shape[0]
            if count >= n:
                break
        return torch.cat(rows)[:n]

    return DataHandle(spec=f"{model}:{hooked.hook_module}", d_in=hooked.d_in, model=None,
                      make_source=lambda seed: build_lm_source(cfg(seed), hooked), eval_batch=eval_batch)
