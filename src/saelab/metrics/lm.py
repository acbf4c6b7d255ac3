"""Metrics for an SAE spliced into the LM: CE loss recovered, KL divergence, EV, L0, dead latents.

For each held-out context the LM runs three times: clean, with the hooked activations of the
non-special tokens replaced by the SAE's reconstruction, and with them replaced by zeros.

    ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)

(1: the splice costs nothing; 0: as bad as deleting the layer's output). KL divergences are
KL(p_clean ‖ p_spliced) per predicted token, averaged. Next-token losses count positions whose
input and target are both real tokens (padding is never a target).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from saelab.activations.hooked_lm import HookedLM
from saelab.activations.text import TokenBatch
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


@torch.no_grad()
def spliced_lm_metrics(
    hooked: HookedLM,
    batches: Iterable[TokenBatch],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    on_acts: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered and KL, with any replacement function."""
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    n_tokens = 0
    for batch in batches:
        ids_BS, mask_BS = batch.input_ids_BS, batch.attention_mask_BS
        valid_BS = (mask_BS[:, :-1].bool() & mask_BS[:, 1:].bool()).to(hooked.device)
        if not valid_BS.any():
            continue

        def splice(acts_ND: torch.Tensor) -> torch.Tensor:
            if on_acts is not None:
                on_acts(acts_ND)
            return reconstruct(acts_ND)

        clean = hooked.logits(ids_BS, mask_BS)
        spliced = hooked.logits(ids_BS, mask_BS, replace=splice)
        zero = hooked.logits(ids_BS, mask_BS, replace=torch.zeros_like)
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
    """Spliced-LM metrics plus EV, MSE, L0 and dead latents on the hooked activations."""
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


@torch.no_grad()
def evaluate_sae_on_rows(sae: Any, rows_ND: torch.Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """EV, MSE, L0 and dead latents on plain activation rows (cached or user files)."""
    calc = ReconstructionCalculator(sae.cfg.d_sae)
    device = sae.W_dec_LD.device
    for start in range(0, rows_ND.shape[0], batch_size):
        x_BD = rows_ND[start : start + batch_size].float().to(device)
        codes_BL = sae.encode(x_BD)
        calc.update(x_BD, codes_BL, sae.decode(codes_BL).float())
    recon = calc.compute()
    return {k: recon[k] for k in ("explained_variance", "mse", "l0", "dead_latents")} | {
        "eval_tokens": recon["n_samples"]
    }
