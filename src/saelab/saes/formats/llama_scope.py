"""Llama Scope (OpenMOSS, Llama-3.1-8B) JumpReLU SAEs: `hyperparams.json` + `checkpoints/final.safetensors`.

The layout SAELens's `llama_scope_sae_huggingface_loader` reads:

    hyperparams.json        d_model (D), d_sae (L), jump_relu_threshold θ₀ (one for every latent),
                            dataset_average_activation_norm {"in": n, ...}, act_fn "jumprelu",
                            norm_activation "dataset-wise", apply_decoder_bias_to_pre_encoder false
    final.safetensors       encoder.weight [L, D], encoder.bias [L], decoder.weight [D, L], decoder.bias [D]

The SAE was trained on inputs scaled by s = √D / n. As SAELens does (`fold_activation_norm_scaling_factor`
with the same s, and θ = θ₀·s), s is folded into the weights, so the SAE takes raw activations:
W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s, θ = θ₀·s; saelab's `jumprelu`. Like SAELens,
this does not apply `sparsity_include_decoder_norm`. The folder may also hold `final.safetensors` directly.
Llama Scope R1-distill folders (config.json + sae_weights.safetensors) are not read: their normalisation
factor is not stored in the folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from saelab.errors import FileFormatError
from saelab.saes.base import SAE
from saelab.saes.formats.common import (
    Fields,
    PretrainedInfo,
    build_sae,
    first_existing,
    read_json_object,
    read_safetensors,
)

FORMAT = "llama_scope"
CONFIG_FILENAME = "hyperparams.json"
WEIGHTS_CANDIDATES = ("checkpoints/final.safetensors", "final.safetensors")


def matches(folder: Path) -> bool:
    return (folder / CONFIG_FILENAME).is_file()


def load(folder: Path, device: str = "cpu") -> tuple[SAE, PretrainedInfo]:
    cfg_path = folder / CONFIG_FILENAME
    cfg = Fields(cfg_path, read_json_object(cfg_path))
    act_fn = cfg.string("act_fn", "jumprelu")
    if act_fn != "jumprelu":
        raise FileFormatError(f"{cfg_path}: act_fn {act_fn!r} is not supported; only Llama Scope's 'jumprelu' SAEs")
    norm = cfg.string("norm_activation", "dataset-wise")
    if norm != "dataset-wise":
        raise FileFormatError(
            f"{cfg_path}: norm_activation {norm!r} is not supported; only 'dataset-wise' (a fixed factor saelab can fold)"
        )
    hook_in, hook_out = cfg.data.get("hook_point_in"), cfg.data.get("hook_point_out")
    if hook_in is not None and hook_out is not None and hook_in != hook_out:
        raise FileFormatError(
            f"{cfg_path}: hook_point_in {hook_in!r} ≠ hook_point_out {hook_out!r}: a transcoder; saelab loads SAEs"
        )
    D, L = cfg.integer("d_model"), cfg.integer("d_sae")
    theta0 = cfg.number("jump_relu_threshold")
    norm_in = cfg.section("dataset_average_activation_norm").number("in", positive=True)
    apply_b_dec = cfg.boolean("apply_decoder_bias_to_pre_encoder", False)
    use_decoder_bias = cfg.boolean("use_decoder_bias", True)
    weights = first_existing(folder, WEIGHTS_CANDIDATES)
    if weights is None:
        raise FileFormatError(f"{folder / WEIGHTS_CANDIDATES[0]} is missing: a Llama Scope SAE keeps its weights there")
    tensors = read_safetensors(weights, "a Llama Scope final.safetensors")
    dims = f"d_model={D}, d_sae={L} in {CONFIG_FILENAME}"
    W_enc_DL = tensors.take("encoder.weight", (L, D), dims).t()
    W_dec_LD = tensors.take("decoder.weight", (D, L), dims).t()
    b_enc_L = tensors.take("encoder.bias", (L,), dims)
    if use_decoder_bias or tensors.has("decoder.bias"):
        b_dec_D = tensors.take("decoder.bias", (D,), dims)
    else:
        b_dec_D = torch.zeros(D)
    tensors.check_no_extra("a Llama Scope SAE holds encoder.weight/.bias and decoder.weight/.bias")
    scale = math.sqrt(D) / norm_in  # s: inputs were multiplied by it in training
    state = {
        "W_enc": (W_enc_DL * scale).contiguous(),
        "W_dec": (W_dec_LD / scale).contiguous(),
        "b_enc": b_enc_L,
        "b_dec": b_dec_D / scale,
        "threshold": torch.full((L,), theta0 * scale),
    }
    fields = {"d_in": D, "d_sae": L, "apply_b_dec_to_input": apply_b_dec}
    sae = build_sae("jumprelu", fields, state, device, weights)
    notes = [f"dataset-wise input norm folded in: s = sqrt(d_model)/{norm_in:g} = {scale:.6g}; threshold θ₀·s"]
    return sae, PretrainedInfo(FORMAT, "Llama Scope JumpReLU", folder, notes)
