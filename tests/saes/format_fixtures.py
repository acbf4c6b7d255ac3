"""Tiny SAEs written in each foreign format's exact on-disk layout (shared by the format and CLI tests).

Each writer returns the folder it wrote. Weights are random but shaped like trained ones: thresholds
positive, so a good share of latents fires and a good share does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

# numpy's stub lets a keyword array collide with `allow_pickle`; the names here never do.
savez: Any = np.savez


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def jumprelu_params(D: int, L: int, seed: int) -> dict[str, torch.Tensor]:
    """W_enc [D, L], W_dec [L, D], b_enc [L], b_dec [D], threshold [L] (positive)."""
    g = _gen(seed)
    return {
        "W_enc": _randn(g, D, L),
        "W_dec": _randn(g, L, D),
        "b_enc": _randn(g, L, scale=0.1),
        "b_dec": _randn(g, D, scale=0.2),
        "threshold": _randn(g, L, scale=0.4).abs() + 0.05,
    }


def write_gemma_scope(folder: Path, D: int = 8, L: int = 16, seed: int = 0) -> Path:
    """Gemma Scope: params.npz with W_enc, W_dec, b_enc, b_dec, threshold (float32 numpy arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = jumprelu_params(D, L, seed)
    savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    return folder


def write_gemma_scope_2(
    folder: Path, D: int = 8, L: int = 16, seed: int = 0, d_out: int | None = None, skip: bool = False
) -> Path:
    """Gemma Scope 2: params.safetensors (w_enc, w_dec, b_enc, b_dec, threshold) + config.json.

    A transcoder (`d_out`) has w_dec [L, d_out], b_dec [d_out] and, with `skip`, affine_skip_connection [D, d_out]."""
    folder.mkdir(parents=True, exist_ok=True)
    params = jumprelu_params(D, L, seed)
    if d_out is not None:
        g = _gen(seed + 100)
        params["W_dec"], params["b_dec"] = _randn(g, L, d_out), _randn(g, d_out, scale=0.2)
        if skip:
            params["affine_skip_connection"] = _randn(g, D, d_out, scale=0.1)
    save_file({k.replace("W_", "w_"): v for k, v in params.items()}, str(folder / "params.safetensors"))
    config: dict[str, Any] = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": "x"}
    if skip:
        config["affine_connection"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_dictionary_learning(
    folder: Path, dict_class: str, D: int = 8, L: int = 16, k: int = 3, seed: int = 0
) -> Path:
    """dictionary_learning: ae.pt (torch.save of the module's state dict) + config.json {"trainer", "buffer"}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    enc_LD, dec_DL = _randn(g, L, D), _randn(g, D, L)
    b_enc_L, b_dec_D = _randn(g, L, scale=0.1), _randn(g, D, scale=0.2)
    trainer = {
        "trainer_class": "Trainer",
        "dict_class": dict_class,
        "activation_dim": D,
        "dict_size": L,
        "lr": 1e-3,
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "device": "cpu",
        "submodule_name": "resid_post_layer_3",
    }
    if dict_class == "AutoEncoder":
        state = {"bias": b_dec_D, "encoder.weight": enc_LD, "encoder.bias": b_enc_L, "decoder.weight": dec_DL}
    elif dict_class == "AutoEncoderNew":
        state = {"encoder.weight": enc_LD, "encoder.bias": b_enc_L, "decoder.weight": dec_DL, "decoder.bias": b_dec_D}
    elif dict_class == "JumpReluAutoEncoder":
        p = jumprelu_params(D, L, seed)
        state = {k_: p[k_] for k_ in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(0.15, dtype=torch.float32),
            "decoder.weight": dec_DL,
            "encoder.weight": enc_LD,
            "encoder.bias": b_enc_L,
            "b_dec": b_dec_D,
        }
        trainer["k"] = k
    elif dict_class == "MatryoshkaBatchTopKSAE":
        sizes = [L // 4, L // 4, L - 2 * (L // 4)]
        state = {
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(0.15, dtype=torch.float32),
            "group_sizes": torch.tensor(sizes),
            "W_enc": enc_LD.t().contiguous(),
            "b_enc": b_enc_L,
            "W_dec": dec_DL.t().contiguous(),
            "b_dec": b_dec_D,
        }
        trainer.update(k=k, group_sizes=sizes, group_fractions=[s / L for s in sizes])
    elif dict_class == "GatedAutoEncoder":
        state = {
            "decoder_bias": b_dec_D,
            "encoder.weight": enc_LD,
            "r_mag": _randn(g, L, scale=0.2),
            "gate_bias": b_enc_L,
            "mag_bias": _randn(g, L, scale=0.1),
            "decoder.weight": dec_DL,
        }
    else:
        raise ValueError(dict_class)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D, "ctx_len": 128}}))
    return folder


def write_sparsify(
    folder: Path, D: int = 8, L: int = 16, k: int = 3, seed: int = 0, skip: bool = False, **cfg_extra
) -> Path:
    """sparsify: cfg.json (SparseCoderConfig fields + d_in) + sae.safetensors (bfloat16, as sparsify saves).

    `skip` adds W_skip [D, D] (sparsify applies it as x W_skipᵀ); pass transcode=True for a transcoder."""
    folder.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    tensors = {
        "encoder.weight": _randn(g, L, D),
        "encoder.bias": _randn(g, L, scale=0.1),
        "W_dec": _randn(g, L, D),
        "b_dec": _randn(g, D, scale=0.2),
    }
    if skip:
        tensors["W_skip"] = _randn(g, D, D, scale=0.1)
    save_file({k_: v.to(torch.bfloat16) for k_, v in tensors.items()}, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": L // D,
        "normalize_decoder": False,
        "num_latents": L,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": False,
        "d_in": D,
        **cfg_extra,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_llama_scope(folder: Path, D: int = 8, L: int = 16, seed: int = 0, norm_in: float = 1.7) -> Path:
    """Llama Scope: hyperparams.json + checkpoints/final.safetensors (nn.Linear layout)."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    tensors = {
        "encoder.weight": _randn(g, L, D),
        "encoder.bias": _randn(g, L, scale=0.1),
        "decoder.weight": _randn(g, D, L),
        "decoder.bias": _randn(g, D, scale=0.2),
    }
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    hyper = {
        "d_model": D,
        "d_sae": L,
        "expansion_factor": L // D,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.4,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_in},
        "sparsity_include_decoder_norm": True,
        "top_k": 50,
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
    }
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    return folder


# ------------------------------------------------------------------------------------------- references
# Each source library's own inference math, transcribed and run in float64 on the files as written:
# (codes [B, L], reconstruction [B, D], margin [B]). The margin is each row's distance to a
# discontinuity (a JumpReLU threshold, a gate, the top-k cut); rows closer than a float32 rounding
# error could flip between implementations, so tests compare only rows with a clear margin.
Reference = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
INF = float("inf")


def _jump(h_BL: torch.Tensor, theta_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.relu(h_BL) * (h_BL > theta_L), (h_BL - theta_L).abs().amin(dim=1)


def _topk(pre_BL: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values_BK, idx_BK = pre_BL.topk(k + 1, dim=1)
    f_BL = torch.zeros_like(pre_BL).scatter(1, idx_BK[:, :k], values_BK[:, :k])
    kth, nxt = values_BK[:, k - 1], values_BK[:, k].clamp_min(0)
    margin = torch.where(kth > 0, kth - nxt, torch.full_like(kth, INF))
    return f_BL, margin


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def ref_gemma_scope(folder: Path, x_BD: torch.Tensor) -> Reference:
    if (folder / "params.npz").exists():
        with np.load(folder / "params.npz") as data:
            p = {k: torch.from_numpy(data[k]).double() for k in data.files}
    else:
        from safetensors.torch import load_file

        p = {k.replace("w_", "W_"): _f64(v) for k, v in load_file(str(folder / "params.safetensors")).items()}
    if (folder / "params.npz").exists() and any("embedding" in part for part in folder.parts[-3:]):
        # Embedding SAEs were trained on embeddings scaled by √d_in (the release's convention).
        scale = p["W_enc"].shape[0] ** 0.5
        p["W_enc"], p["W_dec"] = p["W_enc"] / scale, p["W_dec"] * scale
    h_BL = _f64(x_BD) @ p["W_enc"] + p["b_enc"]
    f_BL, margin = _jump(h_BL, p["threshold"])
    y_hat = f_BL @ p["W_dec"] + p["b_dec"]
    if "affine_skip_connection" in p:  # Gemma Scope 2 skip transcoder: + x · skip ([D, d_out])
        y_hat = y_hat + _f64(x_BD) @ p["affine_skip_connection"]
    return f_BL, y_hat, margin


def ref_dictionary_learning(folder: Path, x_BD: torch.Tensor) -> Reference:
    s = {k: _f64(v) for k, v in torch.load(folder / "ae.pt", weights_only=True).items()}
    cls = json.loads((folder / "config.json").read_text())["trainer"]["dict_class"]
    x = _f64(x_BD)
    if cls == "AutoEncoder":
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"], torch.full((len(x),), INF, dtype=x.dtype)
    if cls == "AutoEncoderNew":
        f = torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"], torch.full((len(x),), INF, dtype=x.dtype)
    if cls == "JumpReluAutoEncoder":
        f, margin = _jump(x @ s["W_enc"] + s["b_enc"], s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"], margin
    if cls == "AutoEncoderTopK":
        pre = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f, margin = _topk(pre, int(s["k"]))
        return f, f @ s["decoder.weight"].T + s["b_dec"], margin
    if cls == "BatchTopKSAE":  # inference: use_threshold=True
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f, margin = _jump(post, s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"], margin
    if cls == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f, margin = _jump(post, s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"], margin
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        pi_gate = x_enc + s["gate_bias"]
        f = (pi_gate > 0) * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"], pi_gate.abs().amin(dim=1)
    raise ValueError(cls)


def ref_sparsify(folder: Path, x_BD: torch.Tensor) -> Reference:
    from safetensors.torch import load_file

    t = {k: _f64(v) for k, v in load_file(str(folder / "sae.safetensors")).items()}
    cfg = json.loads((folder / "cfg.json").read_text())
    x = _f64(x_BD)
    x_in = x if cfg.get("transcode") else x - t["b_dec"]  # SparseCoder.encode
    f, margin = _topk(torch.relu(x_in @ t["encoder.weight"].T + t["encoder.bias"]), cfg["k"])
    y_hat = f @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:  # SparseCoder.forward: sae_out += x @ W_skip.mT
        y_hat = y_hat + x @ t["W_skip"].T
    return f, y_hat, margin


def ref_llama_scope(folder: Path, x_BD: torch.Tensor) -> Reference:
    """SAELens's reading: inputs scaled by s = √D / norm_in, threshold θ₀·s on that scale, outputs unscaled."""
    from safetensors.torch import load_file

    t = {k: _f64(v) for k, v in load_file(str(folder / "checkpoints" / "final.safetensors")).items()}
    hyper = json.loads((folder / "hyperparams.json").read_text())
    s = hyper["d_model"] ** 0.5 / hyper["dataset_average_activation_norm"]["in"]
    h = (_f64(x_BD) * s) @ t["encoder.weight"].T + t["encoder.bias"]
    f, margin = _jump(h, torch.full_like(h[0], hyper["jump_relu_threshold"] * s))
    return f, (f @ t["decoder.weight"].T + t["decoder.bias"]) / s, margin


def clear_rows(margin_B: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    """Rows whose every entry is at least `gap` from a discontinuity (float32 rounding is ~1e-7 here)."""
    return margin_B > gap
