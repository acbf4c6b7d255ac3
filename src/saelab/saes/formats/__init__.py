"""Pretrained SAEs in the formats people release them in, read from local folders (never the hub).

Entry point (what `saelab eval`, `diagnose`, `report`, `convert`, `train --init-from` and `l0 --saes` use):

    load_pretrained(path, device="cpu", *, arch=None, trust_code=False) -> SAE

`path` is an SAE folder (or one of its files); its format is recognised from the files it holds:

    saelens              cfg.json + sae_weights.safetensors          saelab's own and SAELens's (`load_sae`)
    gemma_scope          params.npz (Gemma Scope) or params.safetensors (Gemma Scope 2)        → jumprelu
    dictionary_learning  ae.pt + config.json (AutoEncoder, AutoEncoderNew, JumpReluAutoEncoder,
                         AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, GatedAutoEncoder)
                         → standard / jumprelu / topk / gated
    sparsify             cfg.json + sae.safetensors (TopK; transcoders are refused)            → topk
    llama_scope          hyperparams.json + checkpoints/final.safetensors                      → jumprelu

The result is an ordinary saelab inference SAE (float32, on `device`) whose `encode` / `decode` give
what the source library computes (each module's docstring gives the exact mapping; tests check it
against SAELens's converters). `arch` / `trust_code` apply to SAELens-format folders only, as in
`load_sae`. Every problem (missing file, missing config field, wrong tensor name or shape, truncated
file, a variant that is not supported) is a one-line FileFormatError naming the file and the problem.
Loading never runs code from a file: `.pt` files are read with `torch.load(weights_only=True)` only,
and a pickle that would run code is refused. `detect_format(path)` names the format without loading;
`load_pretrained_with_info` also returns a `PretrainedInfo` (format, the source's own type name,
conversions applied).
"""

from __future__ import annotations

from saelab.saes.formats.common import PretrainedInfo
from saelab.saes.formats.detect import (
    FORMATS,
    detect_format,
    is_sae_path,
    load_pretrained,
    load_pretrained_with_info,
)

__all__ = [
    "FORMATS",
    "PretrainedInfo",
    "detect_format",
    "is_sae_path",
    "load_pretrained",
    "load_pretrained_with_info",
]
