"""A local Hugging Face causal LM with a hook on one module: activations, and SAE splicing.

`--layer N` hooks the output of the N-th transformer block (the residual stream after block N,
`output_hidden_states[N + 1]`); `--hook-module NAME` hooks any named module. Reading activations
stops the forward pass at the hooked module (a private exception from the hook), so layers above
it cost nothing. BOS, padding and every other special token are dropped from the activations.
Models and tokenisers load only from a local folder: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from saelab.dtypes import dtype_from_name
from saelab.errors import ConfigError, FileFormatError


class _StopForward(Exception):
    """Raised by the hook once the activations are captured: nothing above the layer runs."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer blocks: the longest ModuleList whose length is the model's layer count."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def load_causal_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder (`save_pretrained` layout); never touches the hub."""
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").exists():
        raise ConfigError(
            "model",
            str(path),
            "must be a local model folder with config.json "
            "(saelab never downloads; use `save_pretrained` or a hub snapshot folder)",
        )
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("model", str(path), "needs the `transformers` extra: pip install 'saelab[llm]'") from None
    torch_dtype = dtype_from_name(dtype, "model_dtype", allowed=("float32", "bfloat16", "float16"))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars would drown saelab's own progress bar
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        import transformers

        # `dtype=` replaced `torch_dtype=` in transformers 4.56; older versions would silently ignore it.
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        # cast: transformers types the model's decorated `.to` so that no device argument type-checks.
        model = cast(
            nn.Module, AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **{key: torch_dtype})
        )
    except Exception as err:
        raise FileFormatError(f"cannot load a causal LM and tokenizer from {p}: {err}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


class HookedLM:
    """A causal LM, a hooked module, and the token filter (which tokens count as activations)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int | None = None,
        hook_module: str | None = None,
        name: str | None = None,
    ):
        if (layer is None) == (hook_module is None):
            raise ConfigError("layer", layer, "give exactly one of --layer N and --hook-module NAME")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        modules = dict(model.named_modules())
        if layer is not None:
            blocks = find_blocks(model)
            if blocks is None:
                raise ConfigError(
                    "layer",
                    layer,
                    "cannot find this model's transformer blocks; use --hook-module "
                    f"with one of: {_list_names(modules)}",
                )
            prefix, block_list = blocks
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(block_list):
                raise ConfigError(
                    "layer",
                    layer,
                    f"the model has {len(block_list)} blocks; valid layers are "
                    f"0..{len(block_list) - 1} (modules {prefix}.0 .. {prefix}.{len(block_list) - 1})",
                )
            hook_module = f"{prefix}.{layer}"
        if hook_module not in modules or hook_module == "":
            raise ConfigError("hook_module", hook_module, f"no such module; valid names: {_list_names(modules)}")
        self.layer = layer
        self.hook_module = hook_module
        self.module = modules[hook_module]
        self.device = next(model.parameters()).device
        self.special_ids_K = torch.tensor(
            sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long
        )
        self.d_in = self._probe_width()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        layer: int | None = None,
        hook_module: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
    ) -> HookedLM:
        model, tokenizer = load_causal_lm(path, device=device, dtype=dtype)
        return cls(model, tokenizer, layer=layer, hook_module=hook_module, name=str(Path(path).expanduser().resolve()))

    def _probe_width(self) -> int:
        ids_BS = torch.tensor([[0, 0]], dtype=torch.long, device=self.device)
        acts = self.hooked_output(ids_BS, torch.ones_like(ids_BS))
        if acts.ndim != 3:
            raise ConfigError(
                "hook_module", self.hook_module, f"outputs shape {tuple(acts.shape)}; need [batch, seq, d]"
            )
        return int(acts.shape[-1])

    def token_mask(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """True where a token is real and not special (BOS, EOS, padding, UNK, ...)."""
        keep_BS = attention_mask_BS.bool()
        if self.special_ids_K.numel():
            keep_BS &= ~torch.isin(input_ids_BS, self.special_ids_K.to(input_ids_BS.device))
        return keep_BS

    @torch.no_grad()
    def hooked_output(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """[B, S, D] output of the hooked module; the forward pass stops there."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(_first(output))
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(
                input_ids=input_ids_BS.to(self.device),
                attention_mask=attention_mask_BS.to(self.device),
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ConfigError("hook_module", self.hook_module, "was never called during the forward pass")
        return captured[0]

    @torch.no_grad()
    def activations(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """[N, D] activations of the non-special tokens, in (batch, position) order."""
        acts_BSD = self.hooked_output(input_ids_BS, attention_mask_BS)
        keep_BS = self.token_mask(input_ids_BS, attention_mask_BS).to(acts_BSD.device)
        return acts_BSD[keep_BS]

    @torch.no_grad()
    def logits(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[B, S, V] logits; `replace` maps the non-special tokens' activations [N, D] to new ones
        (an SAE's reconstruction, zeros) spliced back in. Special tokens keep their activations."""
        keep_BS = self.token_mask(input_ids_BS, attention_mask_BS).to(self.device)
        handle = None
        if replace is not None:

            def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
                acts_BSD = _first(output)
                new_BSD = acts_BSD.clone()
                new_BSD[keep_BS] = replace(acts_BSD[keep_BS]).to(acts_BSD.dtype)
                if isinstance(output, tuple):
                    return (new_BSD, *output[1:])
                if isinstance(output, list):
                    return [new_BSD, *output[1:]]
                return new_BSD

            handle = self.module.register_forward_hook(hook)
        try:
            out = self.model(
                input_ids=input_ids_BS.to(self.device),
                attention_mask=attention_mask_BS.to(self.device),
                use_cache=False,
            )
        finally:
            if handle is not None:
                handle.remove()
        return out.logits

    def identity(self) -> dict[str, Any]:
        """What a cache records about where its activations came from."""
        return {
            "model": self.name,
            "model_fingerprint": self.fingerprint(),
            "layer": self.layer,
            "hook_module": self.hook_module,
            "d_in": self.d_in,
            "model_class": type(self.model).__name__,
        }

    @torch.no_grad()
    def fingerprint(self) -> str:
        """Identifies the weights, not the folder: a moved model matches, a retrained one does not."""
        import hashlib
        import json

        cfg = getattr(self.model, "config", None)
        cfg_dict = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
        for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg_dict.pop(key, None)
        h = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
        for _, p in list(self.model.named_parameters())[:4]:  # a few tensors are enough to tell models apart
            h.update(p.detach().float().cpu().numpy().tobytes()[: 1 << 20])
        return h.hexdigest()[:16]


def _list_names(modules: dict[str, nn.Module], limit: int = 400) -> str:
    names = [n for n in modules if n]
    text = ", ".join(names[:limit])
    return text + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
