"""Decoder-geometry metrics that need no ground truth ("Sparse but Wrong", Chanin & Garriga-Alonso).

    P_BL = (x − b_dec) Ŵ_decᵀ                 Ŵ_dec: decoder rows scaled to unit norm
    s_n^dec = sorted_desc(flatten(P))[n·B]     the n-th decoder projection score
    c_dec = mean_{i<j} |cos(W_dec,i, W_dec,j)| mean pairwise |cos| of decoder rows

s_n^dec is the global threshold at which, if the normalised decoder were used as the encoder,
n latents per input would be active on average. For n above the data's true L0 (and below
about d_sae/2) it is smallest for SAEs whose latents are single true features: mixing
correlated features into a latent broadens every latent's projection distribution.

Works on any object with a decoder (`W_dec_LD` or SAELens's `W_dec`) and a decoder bias
(`b_dec_D` / `b_dec`), so real-model activations and SAELens SAEs work too.
Shapes: B batch, D d_in, L d_sae.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from saelab.errors import ConfigError, require


def decoder_weights(sae: Any) -> torch.Tensor:
    """The SAE's decoder as [L, D] (saelab `W_dec_LD` or SAELens `W_dec`), detached."""
    W = getattr(sae, "W_dec_LD", None)
    if W is None:
        W = getattr(sae, "W_dec", None)
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ConfigError("sae", type(sae).__name__, "has no 2-D decoder (W_dec_LD or W_dec)")
    return W.detach()


def decoder_bias(sae: Any) -> torch.Tensor | None:
    b = getattr(sae, "b_dec_D", None)
    if b is None:
        b = getattr(sae, "b_dec", None)
    return None if b is None else b.detach()


def unit_decoder(sae: Any) -> torch.Tensor:
    W = decoder_weights(sae).float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _check_batch(sae: Any, x_BD: torch.Tensor) -> tuple[int, int, int]:
    W = decoder_weights(sae)
    L, D = W.shape
    if not isinstance(x_BD, torch.Tensor) or x_BD.ndim != 2:
        raise ConfigError("activations", tuple(getattr(x_BD, "shape", ())), "must be a [batch, d_in] tensor")
    if x_BD.shape[1] != D:
        raise ConfigError(
            "activations",
            tuple(x_BD.shape),
            f"have width {x_BD.shape[1]} but the SAE's d_in is {D}; SAE and data must match",
        )
    require(x_BD.shape[0] > 0, "activations", tuple(x_BD.shape), "need at least one input")
    return x_BD.shape[0], D, L


@torch.no_grad()
def decoder_projections(sae: Any, x_BD: torch.Tensor) -> torch.Tensor:
    """P_BL = (s·x − b_dec) Ŵ_decᵀ, in the SAE's input units (s: its input scale, 1 if none)."""
    _check_batch(sae, x_BD)
    W_LD = unit_decoder(sae)
    x = x_BD.to(W_LD.device).float()
    scale = getattr(sae, "input_scale", None)
    cfg = getattr(sae, "cfg", None)
    if isinstance(scale, torch.Tensor) and getattr(cfg, "normalize_activations", "none") != "none":
        x = x * scale.float()
    b = decoder_bias(sae)
    if b is not None:
        x = x - b.float().to(x.device)
    return x @ W_LD.T


def _check_ns(ns: Sequence[int], L: int) -> list[int]:
    out = []
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, int) or (isinstance(n, float) and not n.is_integer()):
            raise ConfigError("n", n, "must be a positive integer")
        n = int(n)
        require(n >= 1, "n", n, "must be a positive integer")
        require(n < L, "n", n, f"must be smaller than the SAE width d_sae={L} (the reference uses n < d_sae/2)")
        out.append(n)
    return out


@torch.no_grad()
def nth_decoder_projection_scores(sae: Any, x_BD: torch.Tensor, ns: Iterable[int]) -> dict[int, float]:
    """s_n^dec for several n from one projection: {n: sorted_desc(P)[n·B]}."""
    B, _, L = _check_batch(sae, x_BD)
    ns = _check_ns(list(ns), L)
    require(len(ns) > 0, "n", ns, "give at least one n")
    flat = decoder_projections(sae, x_BD).reshape(-1)
    top = flat.topk(max(ns) * B + 1, sorted=True).values
    return {n: float(top[n * B]) for n in ns}


def nth_decoder_projection(sae: Any, x_BD: torch.Tensor, n: int) -> float:
    """s_n^dec: the (n·B)-th largest entry (0-based, descending) of (x − b_dec) Ŵ_decᵀ."""
    return nth_decoder_projection_scores(sae, x_BD, [n])[n]


@torch.no_grad()
def decoder_pairwise_abs_cos(sae_or_W: Any, chunk_size: int = 2048) -> float:
    """Mean |cos| over all pairs i < j of decoder rows (chunked: chunk_size × L at a time)."""
    W = sae_or_W.detach() if isinstance(sae_or_W, torch.Tensor) else decoder_weights(sae_or_W)
    W = W.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L = W.shape[0]
    require(L >= 2, "d_sae", L, "need at least 2 latents for pairwise cosines")
    total = 0.0
    for start in range(0, L, chunk_size):
        stop = min(L, start + chunk_size)
        cos = (W[start:stop] @ W.T).abs_()
        rows = torch.arange(stop - start, device=cos.device)
        cos[rows, rows + start] = 0.0
        total += float(cos.to(torch.float64).sum())
    return total / (L * (L - 1))
