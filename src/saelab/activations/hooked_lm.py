"""A local Hugging Face causal LM with a hook on one module: activations, and SAE splicing.

`--layer N` hooks the output of the N-th transformer block (the residual stream after block N,
`output_hidden_states[N + 1]`); `--hook-module NAME` hooks any named module's output, and
`NAME:input` its input (the first tensor it is called with: for a GPT-2 MLP `transformer.h.1.mlp:input`
is what `ln_2` hands it). Reading activations stops the forward pass once every hook has fired (a
private exception from the hook), so layers above cost nothing. BOS, padding and every other
special token are dropped from the activations. Models and tokenisers load only from a local
folder: nothing is downloaded.

Transcoders: an *output hook* (`--out-hook-module`, same syntax) beside the input hook makes the
LM paired. `paired_activations` gives the input hook's x and the output hook's y at the same token
positions, and `logits(predict=f)` replaces y inside the forward pass by f(x, y), e.g. a transcoder
standing in for the MLP (`--hook-module transformer.h.1.mlp:input --out-hook-module transformer.h.1.mlp`).
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


def _with_first(output: Any, new: torch.Tensor) -> Any:
    """`output` with its (first) tensor replaced by `new`, in the same container."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


HOOK_POINTS = ("output", "input")


def parse_hook(spec: str, option: str) -> tuple[str, str]:
    """`NAME` or `NAME:output` → (NAME, "output"); `NAME:input` → (NAME, "input"). Module names never hold ':'."""
    name, sep, point = str(spec).rpartition(":")
    if not sep:
        return str(spec), "output"
    if point not in HOOK_POINTS:
        raise ConfigError(
            option, spec, "the part after ':' must be 'input' or 'output' (NAME:input hooks the module's input)"
        )
    return name, point


def hook_name(name: str, point: str) -> str:
    """The canonical spelling recorded in caches and runs: NAME for an output, NAME:input for an input."""
    return name if point == "output" else f"{name}:{point}"


ActsFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def register_hook(module: nn.Module, point: str, fn: ActsFn, option: str, spec: str) -> Any:
    """Call fn(acts) at the module's output or input; a tensor it returns replaces those activations."""
    if point == "output":

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            new = fn(_first(output))
            return None if new is None else _with_first(output, new)

        return module.register_forward_hook(hook)

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        raise ConfigError(option, spec, "is called without a tensor input (no positional tensor or hidden_states)")

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


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
    """A causal LM, a hooked module (optionally an output hook too), and the token filter (which
    tokens count as activations)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int | None = None,
        hook_module: str | None = None,
        name: str | None = None,
        out_hook_module: str | None = None,
    ):
        if (layer is None) == (hook_module is None):
            raise ConfigError("layer", layer, "give exactly one of --layer N and --hook-module NAME")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        modules = dict(model.named_modules())
        point = "output"
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
            module_name = f"{prefix}.{layer}"
        else:
            assert hook_module is not None
            module_name, point = parse_hook(hook_module, "hook_module")
        self.layer = layer
        self.module = _find_module(modules, module_name, "hook_module", hook_module)
        self.point = point
        self.hook_module = hook_name(module_name, point)
        self.out_hook_module: str | None = None
        self.out_module: nn.Module | None = None
        self.out_point = "output"
        if out_hook_module is not None:
            out_name, self.out_point = parse_hook(out_hook_module, "out_hook_module")
            self.out_module = _find_module(modules, out_name, "out_hook_module", out_hook_module)
            self.out_hook_module = hook_name(out_name, self.out_point)
        self.device = next(model.parameters()).device
        self.special_ids_K = torch.tensor(
            sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long
        )
        self.d_in, self.d_out = self._probe_widths()

    @property
    def paired(self) -> bool:
        """Whether an output hook is set: activations come as (x, y) pairs, for transcoders."""
        return self.out_module is not None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        layer: int | None = None,
        hook_module: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        out_hook_module: str | None = None,
    ) -> HookedLM:
        model, tokenizer = load_causal_lm(path, device=device, dtype=dtype)
        return cls(
            model,
            tokenizer,
            layer=layer,
            hook_module=hook_module,
            name=str(Path(path).expanduser().resolve()),
            out_hook_module=out_hook_module,
        )

    def _probe_widths(self) -> tuple[int, int | None]:
        ids_BS = torch.tensor([[0, 0]], dtype=torch.long, device=self.device)
        acts_BSD, out_BSE = self._capture(ids_BS, torch.ones_like(ids_BS), with_output=self.paired)
        for option, spec, acts in (
            ("hook_module", self.hook_module, acts_BSD),
            ("out_hook_module", self.out_hook_module, out_BSE),
        ):
            if acts is not None and acts.ndim != 3:
                raise ConfigError(option, spec, f"gives activations of shape {tuple(acts.shape)}; need [batch, seq, d]")
        return int(acts_BSD.shape[-1]), None if out_BSE is None else int(out_BSE.shape[-1])

    def token_mask(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """True where a token is real and not special (BOS, EOS, padding, UNK, ...)."""
        keep_BS = attention_mask_BS.bool()
        if self.special_ids_K.numel():
            keep_BS &= ~torch.isin(input_ids_BS, self.special_ids_K.to(input_ids_BS.device))
        return keep_BS

    def _forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> Any:
        return self.model(
            input_ids=input_ids_BS.to(self.device),
            attention_mask=attention_mask_BS.to(self.device),
            use_cache=False,
        )

    @torch.no_grad()
    def _capture(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, with_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input hook's [B, S, D] (and the output hook's [B, S, E]); the pass stops once all fired."""
        captured: dict[str, torch.Tensor] = {}
        wanted = ("in", "out") if with_output else ("in",)

        def catch(key: str) -> ActsFn:
            def fn(acts: torch.Tensor) -> None:
                captured.setdefault(key, acts)  # a module called twice: its first call counts
                if all(k in captured for k in wanted):
                    raise _StopForward

            return fn

        handles = [register_hook(self.module, self.point, catch("in"), "hook_module", self.hook_module)]
        if with_output:
            assert self.out_module is not None
            handles.append(
                register_hook(
                    self.out_module, self.out_point, catch("out"), "out_hook_module", str(self.out_hook_module)
                )
            )
        try:
            self._forward(input_ids_BS, attention_mask_BS)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for key, option, spec in (
            ("in", "hook_module", self.hook_module),
            ("out", "out_hook_module", self.out_hook_module),
        ):
            if key in wanted and key not in captured:
                raise ConfigError(option, spec, "was never called during the forward pass")
        return captured["in"], captured.get("out")

    @torch.no_grad()
    def hooked_output(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """[B, S, D] activations at the (input) hook; the forward pass stops there."""
        return self._capture(input_ids_BS, attention_mask_BS, with_output=False)[0]

    @torch.no_grad()
    def activations(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """[N, D] activations of the non-special tokens, in (batch, position) order."""
        acts_BSD = self.hooked_output(input_ids_BS, attention_mask_BS)
        keep_BS = self.token_mask(input_ids_BS, attention_mask_BS).to(acts_BSD.device)
        return acts_BSD[keep_BS]

    @torch.no_grad()
    def paired_activations(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, D] input-hook, [N, E] output-hook) activations of the same non-special tokens, row-aligned."""
        if not self.paired:
            raise ConfigError("out_hook_module", None, "paired activations need an output hook (--out-hook-module)")
        x_BSD, y_BSE = self._capture(input_ids_BS, attention_mask_BS, with_output=True)
        assert y_BSE is not None
        keep_BS = self.token_mask(input_ids_BS, attention_mask_BS).to(x_BSD.device)
        return x_BSD[keep_BS], y_BSE.to(x_BSD.device)[keep_BS]

    @torch.no_grad()
    def logits(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[B, S, V] logits. `replace` maps the non-special tokens' activations at the hook [N, D] to new
        ones (an SAE's reconstruction, zeros) spliced back in. `predict` (paired LMs) maps the input
        hook's x [N, D] and the output hook's y [N, E] to what replaces y (a transcoder standing in for
        the MLP: predict(x, y) = transcoder(x)). Special tokens keep their activations."""
        keep_BS = self.token_mask(input_ids_BS, attention_mask_BS).to(self.device)
        handles = []
        if replace is not None:

            def swap(acts_BSD: torch.Tensor) -> torch.Tensor:
                new_BSD = acts_BSD.clone()
                new_BSD[keep_BS] = replace(acts_BSD[keep_BS]).to(acts_BSD.dtype)
                return new_BSD

            handles.append(register_hook(self.module, self.point, swap, "hook_module", self.hook_module))
        if predict is not None:
            if self.out_module is None:
                raise ConfigError("out_hook_module", None, "replacing a module's output needs --out-hook-module")
            seen: list[torch.Tensor] = []

            def keep_input(acts_BSD: torch.Tensor) -> None:
                if not seen:
                    seen.append(acts_BSD)

            def swap_output(out_BSE: torch.Tensor) -> torch.Tensor:
                if not seen:
                    raise ConfigError(
                        "out_hook_module",
                        self.out_hook_module,
                        f"runs before the input hook {self.hook_module}: a transcoder cannot predict it from its input",
                    )
                new_BSE = out_BSE.clone()
                new_BSE[keep_BS] = predict(seen[0][keep_BS], out_BSE[keep_BS]).to(out_BSE.dtype)
                return new_BSE

            handles.append(register_hook(self.module, self.point, keep_input, "hook_module", self.hook_module))
            handles.append(
                register_hook(
                    self.out_module, self.out_point, swap_output, "out_hook_module", str(self.out_hook_module)
                )
            )
        try:
            out = self._forward(input_ids_BS, attention_mask_BS)
        finally:
            for handle in handles:
                handle.remove()
        return out.logits

    def identity(self) -> dict[str, Any]:
        """What a cache records about where its activations came from (the output hook only when set)."""
        identity: dict[str, Any] = {
            "model": self.name,
            "model_fingerprint": self.fingerprint(),
            "layer": self.layer,
            "hook_module": self.hook_module,
            "d_in": self.d_in,
            "model_class": type(self.model).__name__,
        }
        if self.paired:
            identity.update(out_hook_module=self.out_hook_module, d_out=self.d_out)
        return identity

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


def _find_module(modules: dict[str, nn.Module], name: str, option: str, spec: Any) -> nn.Module:
    if name == "" or name not in modules:
        raise ConfigError(option, spec, f"no such module; valid names: {_list_names(modules)}")
    return modules[name]


def _list_names(modules: dict[str, nn.Module], limit: int = 400) -> str:
    names = [n for n in modules if n]
    text = ", ".join(names[:limit])
    return text + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
