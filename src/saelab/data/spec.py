"""`DataSpec`: where a run's activations come from, as one typed config.

Exactly one kind of data per spec:
- `synthetic`: `data` names a preset (`synth-mini`, ...) or a saved synthetic-model folder; the
  ground truth comes with it.
- `files`: `activations` lists [N, d_in] files (.npy and .safetensors are memory-mapped; .pt/.pth
  are read with `torch.load(weights_only=True)`, so a pickle in them never runs).
- `cache`: a folder written by `saelab cache`.
- `lm`: a local Hugging Face causal LM (`model`, `layer` or `hook_module`) run over `dataset`;
  with `out_hook_module` too, (input, target) pairs for transcoders (e.g. an MLP's input and output).

`cache`/`activations` may be combined with `model` (its identity is checked against the cache and,
with a `dataset`, the spliced-LM metrics are computed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from saelab.errors import ConfigError, require

DataKind = Literal["synthetic", "files", "cache", "lm"]
ACTIVATION_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(kw_only=True)
class DataSpec:
    """Where activations come from (see the module docstring for the four kinds)."""

    data: str = field(
        default="synth-mini",
        metadata=_help(
            "Synthetic data: a preset (synth-mini, synth-16k, sbw-toy) or a saved synthetic-model folder. "
            "An activation file or cache folder given here is read as --activations/--cache."
        ),
    )
    model: str | None = field(
        default=None, metadata=_help("Local Hugging Face causal-LM folder (nothing is downloaded).")
    )
    layer: int | None = field(default=None, metadata=_help("Hook the output of this transformer block (0-based)."))
    hook_module: str | None = field(
        default=None,
        metadata=_help("Hook this named module's output instead of --layer; NAME:input hooks the module's input."),
    )
    out_hook_module: str | None = field(
        default=None,
        metadata=_help(
            "Transcoders: the target hook, e.g. --hook-module transformer.h.1.mlp:input --out-hook-module "
            "transformer.h.1.mlp (an MLP's input and output; NAME:input hooks a module's input)."
        ),
    )
    dataset: str | None = field(
        default=None, metadata=_help("Text file, folder of text files, `datasets` save_to_disk folder or token file.")
    )
    text_column: str = field(default="text", metadata=_help("Text column of a `datasets` folder."))
    context_size: int = field(default=128, metadata=_help("Tokens per context fed to the LM."))
    model_batch_size: int = field(default=8, metadata=_help("Contexts per LM forward pass."))
    buffer_size: int = field(default=16384, metadata=_help("Rows in the shuffling buffer of LM activations."))
    model_dtype: str = field(default="float32", metadata=_help("dtype the LM runs in: float32, bfloat16 or float16."))
    prefetch: bool = field(default=True, metadata=_help("Run LM forward passes in a background thread."))
    cache: str | None = field(default=None, metadata=_help("Train from an activation cache written by `saelab cache`."))
    activations: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Activation files, [N, d_in] each: .npy, .safetensors (memory-mapped) or .pt/.pth (tensors only)."
        ),
    )

    def __post_init__(self) -> None:
        self.activations = [str(a) for a in self.activations]
        require(
            isinstance(self.data, str) and self.data.strip() != "",
            "data",
            self.data,
            "name a preset, a model folder, an activation file or a cache folder",
        )
        require(
            isinstance(self.context_size, int) and self.context_size >= 2,
            "context_size",
            self.context_size,
            "must be an integer ≥ 2",
        )
        require(
            isinstance(self.model_batch_size, int) and self.model_batch_size > 0,
            "model_batch_size",
            self.model_batch_size,
            "must be a positive integer",
        )
        require(
            isinstance(self.buffer_size, int) and self.buffer_size > 0,
            "buffer_size",
            self.buffer_size,
            "must be a positive integer",
        )
        if self.model:
            require(
                self.layer is not None or self.hook_module is not None,
                "layer",
                self.layer,
                "--model needs --layer N or --hook-module NAME",
            )
        if self.layer is not None:
            require(isinstance(self.layer, int) and self.layer >= 0, "layer", self.layer, "must be an integer ≥ 0")
        if self.out_hook_module is not None:
            require(
                bool(self.model),
                "out_hook_module",
                self.out_hook_module,
                "needs --model (the LM whose module it names; a cache records its own hooks)",
            )
        if self.cache and self.activations:
            raise ConfigError("activations", self.activations, "give either --cache or --activations, not both")
        if not (self.model or self.cache or self.activations):
            # `--data x.npy` or `--data cache_dir` is read as files / a cache, as diagnostics always did.
            path = Path(self.data).expanduser()
            if path.is_dir() and (path / "manifest.json").is_file():
                self.cache = str(path)
            elif path.suffix.lower() in ACTIVATION_SUFFIXES:
                self.activations = [str(path)]

    @property
    def kind(self) -> DataKind:
        if self.cache:
            return "cache"
        if self.activations:
            return "files"
        if self.model:
            return "lm"
        return "synthetic"

    @property
    def has_ground_truth(self) -> bool:
        return self.kind == "synthetic"

    @property
    def evaluates_on_lm(self) -> bool:
        """Spliced-LM metrics need a model to run and text to run it on."""
        return bool(self.model and self.dataset)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_options(cls, options: Any) -> DataSpec:
        """The DataSpec part of any object with the same field names (a RunConfig, a namespace)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)})

    def describe(self) -> str:
        if self.kind == "synthetic":
            return self.data
        if self.kind == "cache":
            return f"cache {self.cache}"
        if self.kind == "files":
            return ", ".join(self.activations)
        hook = self.hook_module or f"layer {self.layer}"
        if self.out_hook_module:
            hook += f" → {self.out_hook_module}"
        return f"{self.model} @ {hook} on {self.dataset}"
