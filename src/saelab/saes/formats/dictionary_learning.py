"""dictionary_learning (saprmarks/dictionary_learning) SAEs: `ae.pt` (a state dict) + `config.json`.

`config.json` is `{"trainer": {...}, "buffer": {...}}`; the trainer section names the class
(`dict_class`) and gives `activation_dim` (d_in), `dict_size` (d_sae) and, for the TopK family, `k`.
`ae.pt` is read with `torch.load(weights_only=True)`: a pickle that would run code is refused.
Each class, as the library computes it and as SAELens's `dictionary_learning_sae_huggingface_loader_1`
converts it (x̃ = x − b_dec where marked):

    AutoEncoder            bias, encoder.weight [L,D], encoder.bias, decoder.weight [D,L]
                           f = ReLU(x̃ W + b), x̃ = x − bias                          → standard
    AutoEncoderNew         encoder.weight/.bias, decoder.weight/.bias; f = ReLU(x W + b) → standard, no x̃
    JumpReluAutoEncoder    W_enc [D,L], b_enc, W_dec [L,D], b_dec, threshold [L]
                           f = ReLU(h·1[h > θ]), h = x W_enc + b_enc (no x̃)          → jumprelu
    AutoEncoderTopK        encoder.weight/.bias, decoder.weight, b_dec, k; top-k of ReLU(x̃ W + b)  → topk
    BatchTopKSAE           as TopK plus a scalar threshold θ; inference f = ReLU(h)·1[ReLU(h) > θ] → jumprelu
    MatryoshkaBatchTopKSAE W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes; as BatchTopK → jumprelu
    GatedAutoEncoder       encoder.weight, gate_bias, mag_bias, r_mag, decoder.weight, decoder_bias → gated

A BatchTopK threshold of −1 (never set during training) keeps every positive entry, as in the library.
AutoEncoderNew has no SAELens converter (SAELens finds no b_dec in it); the others match it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import FileFormatError
from saelab.saes.base import SAE
from saelab.saes.formats.common import Fields, PretrainedInfo, Tensors, build_sae, read_json_object, read_torch_state

FORMAT = "dictionary_learning"
WEIGHTS_FILENAME = "ae.pt"
CONFIG_FILENAME = "config.json"
KIND = "a dictionary_learning ae.pt"
SUPPORTED = (
    "AutoEncoder",
    "AutoEncoderNew",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "GatedAutoEncoder",
)


def matches(folder: Path) -> bool:
    return (folder / WEIGHTS_FILENAME).is_file()


def config_for(weights: Path) -> Path:
    """config.json beside the weights, or one level up for `checkpoints/ae_<step>.pt`."""
    beside = weights.parent / CONFIG_FILENAME
    if (
        not beside.is_file()
        and weights.parent.name == "checkpoints"
        and (weights.parent.parent / CONFIG_FILENAME).is_file()
    ):
        return weights.parent.parent / CONFIG_FILENAME
    return beside


def load(folder: Path, device: str = "cpu", weights: Path | None = None) -> tuple[SAE, PretrainedInfo]:
    weights = weights or folder / WEIGHTS_FILENAME
    config_path = config_for(weights)
    if not config_path.is_file():
        raise FileFormatError(
            f"{config_path} is missing: a dictionary_learning SAE needs the config.json saved with it"
        )
    trainer = Fields(config_path, read_json_object(config_path)).section("trainer")
    dict_class = trainer.string("dict_class")
    if dict_class not in SUPPORTED:
        raise FileFormatError(
            f"{config_path}: trainer.dict_class {dict_class!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    D, L = trainer.integer("activation_dim"), trainer.integer("dict_size")
    tensors = read_torch_state(weights, KIND)
    if {"ae", "optimizer"} <= set(tensors.tensors):
        raise FileFormatError(
            f"{weights} is a training backup (step, ae, optimizer), not a finished SAE; "
            "use the ae.pt written at the end of training"
        )
    dims = f"activation_dim={D}, dict_size={L} in {config_path.name}"
    arch, fields, state, notes = _READERS[dict_class](tensors, trainer, D, L, dims)
    tensors.check_no_extra(f"a {dict_class} holds {', '.join(sorted(tensors.used)) or 'other tensors'}")
    sae = build_sae(arch, {"d_in": D, "d_sae": L, **fields}, state, device, weights)
    return sae, PretrainedInfo(
        FORMAT, dict_class, weights.parent if weights.name == WEIGHTS_FILENAME else weights, notes
    )


Read = tuple[str, dict[str, Any], dict[str, Any], list[str]]


def _linear(tensors: Tensors, D: int, L: int, dims: str) -> dict[str, Any]:
    """nn.Linear encoder [L, D] and decoder [D, L], transposed to SAELens's W_enc [D, L], W_dec [L, D]."""
    return {
        "W_enc": tensors.take("encoder.weight", (L, D), dims).t().contiguous(),
        "W_dec": tensors.take("decoder.weight", (D, L), dims).t().contiguous(),
    }


def _auto_encoder(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    state = {
        **_linear(tensors, D, L, dims),
        "b_enc": tensors.take("encoder.bias", (L,), dims),
        "b_dec": tensors.take("bias", (D,), dims),
    }
    return "standard", {"apply_b_dec_to_input": True}, state, []


def _auto_encoder_new(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    state = {
        **_linear(tensors, D, L, dims),
        "b_enc": tensors.take("encoder.bias", (L,), dims),
        "b_dec": tensors.take("decoder.bias", (D,), dims),
    }
    return "standard", {"apply_b_dec_to_input": False}, state, []


def _jump_relu(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    state = {
        "W_enc": tensors.take("W_enc", (D, L), dims),
        "W_dec": tensors.take("W_dec", (L, D), dims),
        "b_enc": tensors.take("b_enc", (L,), dims),
        "b_dec": tensors.take("b_dec", (D,), dims),
        "threshold": tensors.take_threshold("threshold", L),
    }
    return "jumprelu", {"apply_b_dec_to_input": False}, state, []


def _k(tensors: Tensors, trainer: Fields, L: int) -> int:
    k = trainer.integer("k")
    if tensors.has("k") and tensors.integer("k") != k:
        raise FileFormatError(f"{tensors.path}: tensor 'k' is {tensors.integer('k')} but config.json trainer.k is {k}")
    if k > L:
        raise FileFormatError(f"{trainer.path}: trainer.k={k} exceeds dict_size={L}")
    return k


def _top_k(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    k = _k(tensors, trainer, L)
    state = {
        **_linear(tensors, D, L, dims),
        "b_enc": tensors.take("encoder.bias", (L,), dims),
        "b_dec": tensors.take("b_dec", (D,), dims),
    }
    tensors.ignore("threshold")  # a running estimate; AutoEncoderTopK encodes by per-sample top-k
    return "topk", {"k": k, "rescale_acts_by_decoder_norm": False, "apply_b_dec_to_input": True}, state, []


def _batch_top_k(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    _k(tensors, trainer, L)
    state = {
        **_linear(tensors, D, L, dims),
        "b_enc": tensors.take("encoder.bias", (L,), dims),
        "b_dec": tensors.take("b_dec", (D,), dims),
        "threshold": tensors.take_threshold("threshold", L),
    }
    return "jumprelu", {"apply_b_dec_to_input": True}, state, [_threshold_note(state["threshold"])]


def _matryoshka(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    _k(tensors, trainer, L)
    state = {
        "W_enc": tensors.take("W_enc", (D, L), dims),
        "W_dec": tensors.take("W_dec", (L, D), dims),
        "b_enc": tensors.take("b_enc", (L,), dims),
        "b_dec": tensors.take("b_dec", (D,), dims),
        "threshold": tensors.take_threshold("threshold", L),
    }
    if tensors.has("group_sizes"):
        sizes = tensors.raw("group_sizes")
        if sizes.dtype.is_floating_point or int(sizes.sum()) != L:
            raise FileFormatError(f"{tensors.path}: tensor 'group_sizes' must be integers summing to dict_size={L}")
    return "jumprelu", {"apply_b_dec_to_input": True}, state, [_threshold_note(state["threshold"])]


def _gated(tensors: Tensors, trainer: Fields, D: int, L: int, dims: str) -> Read:
    state = {
        "W_enc": tensors.take("encoder.weight", (L, D), dims).t().contiguous(),
        "W_dec": tensors.take("decoder.weight", (D, L), dims).t().contiguous(),
        "b_gate": tensors.take("gate_bias", (L,), dims),
        "b_mag": tensors.take("mag_bias", (L,), dims),
        "r_mag": tensors.take("r_mag", (L,), dims),
        "b_dec": tensors.take("decoder_bias", (D,), dims),
    }
    return "gated", {"apply_b_dec_to_input": True}, state, []


def _threshold_note(threshold_L: Any) -> str:
    value = float(threshold_L[0]) if threshold_L.numel() else float("nan")
    if value < 0:
        return "BatchTopK threshold was never set in training (−1): every positive pre-activation fires"
    return f"BatchTopK global threshold {value:.6g} applied to every latent (JumpReLU inference form)"


_READERS = {
    "AutoEncoder": _auto_encoder,
    "AutoEncoderNew": _auto_encoder_new,
    "JumpReluAutoEncoder": _jump_relu,
    "AutoEncoderTopK": _top_k,
    "BatchTopKSAE": _batch_top_k,
    "MatryoshkaBatchTopKSAE": _matryoshka,
    "GatedAutoEncoder": _gated,
}
