"""Gemma Scope JumpReLU SAEs: `params.npz` (Gemma Scope, Gemma 2) or `params.safetensors` (Gemma Scope 2, Gemma 3).

The layout SAELens's `gemma_2_sae_huggingface_loader` / `gemma_3_sae_huggingface_loader` read:

    W_enc [D, L], W_dec [L, D], b_enc [L], b_dec [D], threshold [L]    (Gemma Scope 2 spells w_enc, w_dec)
    h = x W_enc + b_enc   (b_dec is not subtracted from the input),   f = ReLU(h)·1[h > θ],   x̂ = f W_dec + b_dec

so the SAE is saelab's `jumprelu` with `apply_b_dec_to_input=False`. d_in and d_sae come from W_enc's
shape (the files carry no config). Embedding SAEs (a folder under `embedding/`, as in the release) were
trained on embeddings scaled by √d_in; as SAELens does, W_enc is divided and W_dec multiplied by √d_in.
A Gemma Scope 2 transcoder (a decoder wider or narrower than the input, or an `affine_skip_connection`
[d_in, d_out]) loads as saelab's `jumprelu` transcoder: `d_out` from W_dec, W_skip = the skip transposed.
A transcoder whose output width equals its input's and has no skip cannot be told from an SAE by its
files (SAELens goes by the hub folder's name); it loads as the SAE that computes the same function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saelab.errors import FileFormatError
from saelab.saes.base import SAE
from saelab.saes.formats.common import (
    PretrainedInfo,
    Tensors,
    build_sae,
    output_width,
    read_json_object,
    read_npz,
    read_safetensors,
    transcoders_supported,
)

FORMAT = "gemma_scope"
NPZ_FILENAME = "params.npz"
SAFETENSORS_FILENAME = "params.safetensors"  # Gemma Scope 2
CONFIG_FILENAME = "config.json"  # Gemma Scope 2 (optional, as in SAELens)


def matches(folder: Path) -> bool:
    return (folder / NPZ_FILENAME).is_file() or (folder / SAFETENSORS_FILENAME).is_file()


def is_embedding_sae(folder: Path) -> bool:
    """The release keeps embedding SAEs under `embedding/width_*/average_l0_*` (SAELens tests the same name)."""
    return any("embedding" in part for part in folder.parts[-3:])


def load(folder: Path, device: str = "cpu") -> tuple[SAE, PretrainedInfo]:
    notes: list[str] = []
    if (folder / NPZ_FILENAME).is_file():
        tensors = read_npz(folder / NPZ_FILENAME, "a Gemma Scope params.npz")
        variant = "Gemma Scope (params.npz)"
    else:
        config_path = folder / CONFIG_FILENAME
        if config_path.is_file():
            arch = read_json_object(config_path).get("architecture")
            if arch != "jump_relu":
                raise FileFormatError(
                    f"{config_path}: architecture is {arch!r}; only Gemma Scope 2's 'jump_relu' SAEs are supported"
                )
        tensors = read_safetensors(folder / SAFETENSORS_FILENAME, "a Gemma Scope 2 params.safetensors")
        variant = "Gemma Scope 2 (params.safetensors)"
    name = _names(tensors)
    W_enc_raw = tensors.raw(name["W_enc"])
    if W_enc_raw.dim() != 2:
        raise FileFormatError(
            f"{tensors.path}: tensor {name['W_enc']!r} has shape {tuple(W_enc_raw.shape)}, expected [d_in, d_sae]"
        )
    D, L = (int(s) for s in W_enc_raw.shape)
    dims = f"d_in={D}, d_sae={L} (from {name['W_enc']})"
    is_v2 = variant.startswith("Gemma Scope 2")
    W_dec_raw = tensors.raw(name["W_dec"])
    skip = is_v2 and tensors.has("affine_skip_connection")
    wider = W_dec_raw.dim() == 2 and W_dec_raw.shape[0] == L and W_dec_raw.shape[1] != D
    transcoder = is_v2 and (skip or wider)  # a Gemma Scope 2 transcoder: its decoder writes another activation
    if transcoder and not transcoders_supported():
        raise FileFormatError(f"{tensors.path} is a Gemma Scope 2 transcoder; this saelab loads SAEs only")
    E = output_width(tensors, name["W_dec"], L) if transcoder else D
    dims_out = f"{dims}, output width {E} (from {name['W_dec']})" if transcoder else dims
    state = {
        "W_enc": tensors.take(name["W_enc"], (D, L), dims),
        "W_dec": tensors.take(name["W_dec"], (L, E), dims_out),
        "b_enc": tensors.take("b_enc", (L,), dims),
        "b_dec": tensors.take("b_dec", (E,), dims_out),
        "threshold": tensors.take("threshold", (L,), dims),
    }
    if skip:  # stored [d_in, d_out]; saelab and SAELens keep W_skip [d_out, d_in]
        state["W_skip"] = tensors.take("affine_skip_connection", (D, E), dims_out).t().contiguous()
    _check_scaling_factor(tensors, L)
    tensors.check_no_extra("a Gemma Scope SAE holds W_enc, W_dec, b_enc, b_dec and threshold")
    if not is_v2 and is_embedding_sae(folder):
        scale = math.sqrt(D)
        state["W_enc"] = state["W_enc"] / scale
        state["W_dec"] = state["W_dec"] * scale
        notes.append(f"embedding SAE: W_enc divided and W_dec multiplied by sqrt(d_in)={scale:.4g}, as SAELens does")
    fields: dict[str, Any] = {"d_in": D, "d_sae": L, "apply_b_dec_to_input": False}
    if transcoder:
        fields.update(d_out=E, skip=skip)
        variant = f"Gemma Scope 2 {'skip ' if skip else ''}transcoder (params.safetensors)"
    sae = build_sae("jumprelu", fields, state, device, tensors.path)
    return sae, PretrainedInfo(FORMAT, variant, folder, notes)


def _names(tensors: Tensors) -> dict[str, str]:
    """The file's spelling of W_enc / W_dec (SAELens maps a leading "w_" to "W_")."""
    return {n: (f"w_{n[2:]}" if tensors.has(f"w_{n[2:]}") and not tensors.has(n) else n) for n in ("W_enc", "W_dec")}


def _check_scaling_factor(tensors: Tensors, d_sae: int) -> None:
    """An all-ones `scaling_factor` is a no-op SAELens drops; any other value would scale the codes."""
    if not tensors.has("scaling_factor"):
        return
    factor = tensors.take("scaling_factor", tuple(tensors.raw("scaling_factor").shape))
    if factor.numel() not in (1, d_sae) or not bool(torch.allclose(factor, torch.ones_like(factor))):
        raise FileFormatError(
            f"{tensors.path}: tensor 'scaling_factor' is not all ones; fine-tuning scaling factors are not supported"
        )
