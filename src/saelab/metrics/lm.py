"""Metrics for an SAE or transcoder spliced into the LM: CE loss recovered, KL divergence, EV, L0, dead latents.

For each held-out context the LM runs three times: clean, with the hooked activations of the
non-special tokens replaced by the SAE's reconstruction, and with them replaced by zeros.

    ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)

(1: the splice costs nothing; 0: as bad as deleting the layer's output). KL divergences are
KL(p_clean ‖ p_spliced) per predicted token, averaged. Next-token losses count positions whose
input and target are both real tokens (padding is never a target).

A transcoder (`cfg.d_out` set) on a paired HookedLM (input and output hooks, e.g. an MLP's input
and output) replaces the output hook's activations y by its prediction ŷ = decode(encode(x)) + skip
from the input hook's x, inside the same forward pass; "zero" then zeroes y (the MLP's output), and
`fvu` = E‖y − ŷ‖² / (E‖y‖² − ‖E y‖²) = 1 − explained_variance of the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from saelab.activations.hooked_lm import HookedLM
from saelab.activations.text import TokenBatch
from saelab.errors import ConfigError, require
from saelab.metrics.reconstruction import ReconstructionCalculator


def _token_losses(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE at positions with a valid target: [N]."""
    logp_BSV = F.log_softmax(logits_BSV[:, :-1].float(), dim=-1)
    target_BS = input_ids_BS[:, 1:].to(logits_BSV.device)
    ce_BS = -logp_BSV.gather(-1, target_BS.unsqueeze(-1)).squeeze(-1)
    return ce_BS[valid_BS]


def _kl(clean_BSV: torch.Tensor, other_BSV: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    p_log = F.log_softmax(clean_BSV[:, :-1].float(), dim=-1)
    q_log = F.log_softmax(other_BSV[:, :-1].float(), dim=-1)
    kl_BS = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl_BS[valid_BS]


# Besides ce_loss_recovered and kl_div (metrics/names.py): the parts they are computed from.
SPLICE_DETAIL_KEYS = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation", "kl_div_zero_ablation")

Logits = Callable[[TokenBatch], torch.Tensor]  # a token batch → [B, S, V] logits of one kind of pass


@torch.no_grad()
def spliced_lm_metrics(
    hooked: HookedLM,
    batches: Iterable[TokenBatch],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    on_acts: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered and KL, with any replacement function."""

    def splice(acts_ND: torch.Tensor) -> torch.Tensor:
        if on_acts is not None:
            on_acts(acts_ND)
        return reconstruct(acts_ND)

    return _splice_metrics(
        hooked,
        batches,
        lambda b: hooked.logits(b.input_ids_BS, b.attention_mask_BS, replace=splice),
        lambda b: hooked.logits(b.input_ids_BS, b.attention_mask_BS, replace=torch.zeros_like),
    )


@torch.no_grad()
def replaced_output_lm_metrics(
    hooked: HookedLM, batches: Iterable[TokenBatch], predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> dict[str, float]:
    """The same metrics with the output hook's y replaced by predict(x, y) (x: the input hook's
    activations): a transcoder standing in for an MLP. Zero-ablation zeroes y."""
    return _splice_metrics(
        hooked,
        batches,
        lambda b: hooked.logits(b.input_ids_BS, b.attention_mask_BS, predict=predict),
        lambda b: hooked.logits(b.input_ids_BS, b.attention_mask_BS, predict=lambda _x, y: torch.zeros_like(y)),
    )


def _splice_metrics(
    hooked: HookedLM, batches: Iterable[TokenBatch], spliced_logits: Logits, zero_logits: Logits
) -> dict[str, float]:
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    n_tokens = 0
    for batch in batches:
        ids_BS, mask_BS = batch.input_ids_BS, batch.attention_mask_BS
        valid_BS = (mask_BS[:, :-1].bool() & mask_BS[:, 1:].bool()).to(hooked.device)
        if not valid_BS.any():
            continue
        clean = hooked.logits(ids_BS, mask_BS)
        spliced = spliced_logits(batch)
        zero = zero_logits(batch)
        sums["clean"] += float(_token_losses(clean, ids_BS, valid_BS).sum())
        sums["spliced"] += float(_token_losses(spliced, ids_BS, valid_BS).sum())
        sums["zero"] += float(_token_losses(zero, ids_BS, valid_BS).sum())
        sums["kl"] += float(_kl(clean, spliced, valid_BS).sum())
        sums["kl_zero"] += float(_kl(clean, zero, valid_BS).sum())
        n_tokens += int(valid_BS.sum())
    n = max(n_tokens, 1)
    ce_clean, ce_spliced, ce_zero = sums["clean"] / n, sums["spliced"] / n, sums["zero"] / n
    gap = ce_zero - ce_clean
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_spliced": ce_spliced,
        "ce_loss_zero_ablation": ce_zero,
        # A layer whose removal costs nothing leaves nothing to recover: report NaN, not a ratio of noise.
        "ce_loss_recovered": (ce_zero - ce_spliced) / gap if abs(gap) > 1e-9 else float("nan"),
        "kl_div": sums["kl"] / n,
        "kl_div_zero_ablation": sums["kl_zero"] / n,
        "eval_tokens": n_tokens,
    }


@torch.no_grad()
def evaluate_sae_on_lm(sae: Any, hooked: HookedLM, batches: Iterable[TokenBatch]) -> dict[str, Any]:
    """Spliced-LM metrics plus EV, MSE, L0 and dead latents on the hooked activations (a transcoder:
    spliced in place of the output hook, with its target's FVU; see the module docstring)."""
    if getattr(sae.cfg, "d_out", None) is not None:
        return evaluate_transcoder_on_lm(sae, hooked, batches)
    calc = ReconstructionCalculator(sae.cfg.d_sae)
    sae_device = sae.W_dec_LD.device

    def reconstruct(acts_ND: torch.Tensor) -> torch.Tensor:
        x_ND = acts_ND.float().to(sae_device)
        codes_NL = sae.encode(x_ND)
        x_hat_ND = sae.decode(codes_NL).float()
        calc.update(x_ND, codes_NL, x_hat_ND)
        return x_hat_ND.to(acts_ND.device)

    result = spliced_lm_metrics(hooked, batches, reconstruct)
    recon = calc.compute()
    return {**{k: recon[k] for k in ("explained_variance", "mse", "l0", "dead_latents")}, **result}


def _transcoder_step(sae: Any, x_BD: torch.Tensor, y_BE: torch.Tensor, calc: ReconstructionCalculator) -> torch.Tensor:
    """ŷ = decode(encode(x)) + x W_skipᵀ in y's units, scored against y; float32 on the SAE's device."""
    x_BD = x_BD.float().to(sae.W_dec_LD.device)
    codes_BL = sae.encode(x_BD)
    y_hat_BE = sae.decode(codes_BL).float()
    skip_BE = sae.skip_out(x_BD)
    if skip_BE is not None:
        y_hat_BE = y_hat_BE + sae.unscale_output(skip_BE).float()
    calc.update(y_BE.float().to(y_hat_BE.device), codes_BL, y_hat_BE)
    return y_hat_BE


def _transcoder_scores(sae: Any, calc: ReconstructionCalculator) -> dict[str, Any]:
    recon = calc.compute()
    out = {k: recon[k] for k in ("explained_variance", "mse", "l0", "dead_latents")}
    out["fvu"] = 1.0 - recon["explained_variance"]
    out["skip_norm"] = float(sae.W_skip_ED.norm()) if getattr(sae.cfg, "skip", False) else None
    return out


@torch.no_grad()
def evaluate_transcoder_on_lm(sae: Any, hooked: HookedLM, batches: Iterable[TokenBatch]) -> dict[str, Any]:
    """A transcoder in place of the paired LM's output hook: CE/KL metrics, and FVU, MSE, L0 and dead
    latents of its prediction of the output hook's activations (explained_variance = 1 − fvu)."""
    if not hooked.paired:
        raise ConfigError(
            "out_hook_module",
            None,
            f"the transcoder (d_out={sae.cfg.d_out}) replaces an output hook: give --out-hook-module "
            f"(e.g. the MLP whose input --hook-module {hooked.hook_module} reads)",
        )
    require(
        (sae.cfg.d_in, sae.cfg.d_out) == (hooked.d_in, hooked.d_out),
        "sae",
        f"d_in={sae.cfg.d_in}, d_out={sae.cfg.d_out}",
        f"does not fit {hooked.hook_module} → {hooked.out_hook_module} (d_in={hooked.d_in}, d_out={hooked.d_out})",
    )
    calc = ReconstructionCalculator(sae.cfg.d_sae)

    def predict(x_ND: torch.Tensor, y_NE: torch.Tensor) -> torch.Tensor:
        return _transcoder_step(sae, x_ND, y_NE, calc).to(y_NE.device)

    result = replaced_output_lm_metrics(hooked, batches, predict)
    return {**_transcoder_scores(sae, calc), **result}


@torch.no_grad()
def evaluate_sae_on_rows(
    sae: Any, rows_ND: torch.Tensor, batch_size: int = 4096, targets_NE: torch.Tensor | None = None
) -> dict[str, Any]:
    """EV, MSE, L0 and dead latents on plain activation rows (cached or user files). A transcoder
    needs the rows' `targets_NE` (a paired cache) and is scored on them, with `fvu`."""
    calc = ReconstructionCalculator(sae.cfg.d_sae)
    device = sae.W_dec_LD.device
    transcoder = getattr(sae.cfg, "d_out", None) is not None
    if transcoder:
        require(
            targets_NE is not None and targets_NE.shape[0] == rows_ND.shape[0],
            "targets",
            None if targets_NE is None else tuple(targets_NE.shape),
            f"a transcoder (d_out={sae.cfg.d_out}) is scored on (input, target) rows: pass the {rows_ND.shape[0]} targets",
        )
        assert targets_NE is not None
    for start in range(0, rows_ND.shape[0], batch_size):
        x_BD = rows_ND[start : start + batch_size].float().to(device)
        if transcoder:
            assert targets_NE is not None
            _transcoder_step(sae, x_BD, targets_NE[start : start + batch_size], calc)
            continue
        codes_BL = sae.encode(x_BD)
        calc.update(x_BD, codes_BL, sae.decode(codes_BL).float())
    if transcoder:
        return _transcoder_scores(sae, calc) | {"eval_tokens": calc.compute()["n_samples"]}
    recon = calc.compute()
    return {k: recon[k] for k in ("explained_variance", "mse", "l0", "dead_latents")} | {
        "eval_tokens": recon["n_samples"]
    }
