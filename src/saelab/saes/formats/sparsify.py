"""sparsify (EleutherAI/sparsify) TopK sparse coders: `cfg.json` + `sae.safetensors`, one folder per hookpoint.

What `SparseCoder.save_to_disk` writes and `SparseCoder.encode` / `decode` compute:

    cfg.json          d_in, k, num_latents (0: d_in × expansion_factor), activation, transcode, skip_connection, ...
    sae.safetensors   encoder.weight [L, D], encoder.bias [L], W_dec [L, D], b_dec [D] (W_skip [D, D] with a skip)
    f = top-k of ReLU((x − b_dec) Wᵀ + b),   x̂ = f W_dec + b_dec

which is saelab's `topk` with `rescale_acts_by_decoder_norm=False` (sparsify does not rescale codes by
decoder norms). A transcoder (`transcode: true`) does not subtract b_dec from its input and may add a
skip, ŷ = f W_dec + b_dec + x W_skipᵀ: saelab's `topk` transcoder (`d_out` = W_dec's width, `skip`,
`apply_b_dec_to_input=False`). A skip on a plain SAE and the "groupmax" activation are refused.

SAELens's `sparsify_disk_loader` differs from sparsify in two ways (checked against SAELens 6.54):
it transposes W_dec to [D, L], so its SAE cannot load the tensors unless d_in = d_sae, and it
subtracts b_dec from the input only when `normalize_decoder` is false, where sparsify always does.
saelab follows sparsify's own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import FileFormatError
from saelab.saes.base import SAE
from saelab.saes.formats.common import (
    Fields,
    PretrainedInfo,
    build_sae,
    output_width,
    read_json_object,
    read_safetensors,
    transcoders_supported,
)

FORMAT = "sparsify"
CONFIG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
# Options that change what the coder computes; saelab reads only the plain TopK SAE.
_UNSUPPORTED_FLAGS = ("signed", "matching_pursuit", "normalize_io", "monet")


def matches(folder: Path) -> bool:
    return (folder / WEIGHTS_FILENAME).is_file()


def load(folder: Path, device: str = "cpu") -> tuple[SAE, PretrainedInfo]:
    cfg_path = folder / CONFIG_FILENAME
    cfg = Fields(cfg_path, read_json_object(cfg_path))
    transcode, skip = cfg.boolean("transcode", False), cfg.boolean("skip_connection", False)
    if transcode and not transcoders_supported():
        raise FileFormatError(
            f"{cfg_path}: transcode=true: sparsify transcoders are not supported yet "
            "(saelab's SAE classes have no separate output space or skip connection)"
        )
    if skip and not transcode:
        raise FileFormatError(
            f"{cfg_path}: skip_connection=true without transcode is not supported (in saelab only a transcoder has a skip)"
        )
    activation = cfg.string("activation", "topk")
    if activation != "topk":
        raise FileFormatError(f"{cfg_path}: activation {activation!r} is not supported; only 'topk'")
    for flag in _UNSUPPORTED_FLAGS:
        if cfg.boolean(flag, False):
            raise FileFormatError(f"{cfg_path}: {flag}=true is not supported; only plain TopK sparse coders")
    if cfg.integer("n_targets", 0, minimum=0):
        raise FileFormatError(f"{cfg_path}: n_targets > 0 (a cross-layer coder) is not supported")
    D, k = cfg.integer("d_in"), cfg.integer("k")
    L = cfg.integer("num_latents", 0, minimum=0) or D * cfg.integer("expansion_factor")
    if k > L:
        raise FileFormatError(f"{cfg_path}: k={k} exceeds the number of latents {L}")
    tensors = read_safetensors(folder / WEIGHTS_FILENAME, "a sparsify sae.safetensors")
    dims = f"d_in={D}, num_latents={L} in {CONFIG_FILENAME}"
    # A transcoder's decoder writes its target's width E (sparsify's own transcoders have E = d_in).
    E = output_width(tensors, "W_dec", L) if transcode else D
    dims_out = f"{dims}, output width {E} (from W_dec)" if transcode else dims
    state = {
        "W_enc": tensors.take("encoder.weight", (L, D), dims).t().contiguous(),
        "b_enc": tensors.take("encoder.bias", (L,), dims),
        "W_dec": tensors.take("W_dec", (L, E), dims_out),
        "b_dec": tensors.take("b_dec", (E,), dims_out),
    }
    if skip:  # ŷ = f W_dec + b_dec + x W_skipᵀ, W_skip [E, D] as saelab and SAELens store it
        state["W_skip"] = tensors.take("W_skip", (E, D), dims_out)
    tensors.check_no_extra("a sparsify coder holds encoder.weight, encoder.bias, W_dec, b_dec (and W_skip with a skip)")
    fields: dict[str, Any] = {"d_in": D, "d_sae": L, "k": k, "rescale_acts_by_decoder_norm": False}
    if transcode:  # sparsify does not centre a transcoder's input: b_dec is the output's bias
        fields.update(d_out=E, skip=skip, apply_b_dec_to_input=False)
        variant = f"SparseCoder (TopK transcoder{', skip' if skip else ''})"
    else:
        fields["apply_b_dec_to_input"] = True
        variant = "SparseCoder (TopK)"
    sae = build_sae("topk", fields, state, device, tensors.path)
    return sae, PretrainedInfo(FORMAT, variant, folder)
