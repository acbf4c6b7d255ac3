"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Nested prefixes of the dictionary must each reconstruct the input on their own: the loss adds the
MSE of every inner prefix [0, m_ℓ) to the full BatchTopK loss, which keeps general (parent)
features in the early latents and counters absorption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from saelab.errors import require
from saelab.saes.base import StepContext, mse_per_sample
from saelab.saes.batchtopk import BatchTopKSAEConfig
from saelab.saes.kernels import SparseActs
from saelab.saes.registry import register_sae
from saelab.saes.topk_family import BatchThresholdMixin, TopKFamilySAE, select_batch_topk


@dataclass(kw_only=True)
class MatryoshkaSAEConfig(BatchTopKSAEConfig):
    matryoshka_widths: list[int] = field(default_factory=list)
    use_matryoshka_aux_loss: bool = True
    # Weight of each inner prefix's MSE, innermost first (None = all 1). The full-width MSE keeps
    # weight 1: under Adam only the ratios matter ("balanced Matryoshka", Feature Hedging §5).
    inner_loss_multipliers: list[float] | None = None

    def validate(self) -> None:
        super().validate()
        widths = list(self.matryoshka_widths) or default_matryoshka_widths(self.d_sae)
        require(
            all(isinstance(w, int) and w > 0 for w in widths), "matryoshka_widths", widths, "must be positive integers"
        )
        require(
            all(a < b for a, b in zip(widths, widths[1:])),
            "matryoshka_widths",
            widths,
            "must be strictly increasing (widths must nest)",
        )
        require(widths[-1] <= self.d_sae, "matryoshka_widths", widths, f"must not exceed d_sae={self.d_sae}")
        # The outer level is always the full SAE.
        self.matryoshka_widths = widths if widths[-1] == self.d_sae else widths + [self.d_sae]
        multipliers = self.inner_loss_multipliers
        if multipliers is not None:
            require(
                isinstance(multipliers, (list, tuple))
                and len(multipliers) == len(self.matryoshka_widths) - 1
                and all(isinstance(m, (int, float)) and math.isfinite(m) and m >= 0 for m in multipliers),
                "inner_loss_multipliers",
                multipliers,
                f"must be {len(self.matryoshka_widths) - 1} finite numbers ≥ 0, one per inner level "
                f"of matryoshka_widths={self.matryoshka_widths}",
            )
            self.inner_loss_multipliers = [float(m) for m in multipliers]

    def inner_multipliers(self) -> list[float]:
        return self.inner_loss_multipliers or [1.0] * (len(self.matryoshka_widths) - 1)


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """SynthSAEBench's nesting for width 4096 ([128, 512, 2048, 4096]), scaled to d_sae."""
    return sorted({max(1, d_sae // 32), max(2, d_sae // 8), max(3, d_sae // 2), d_sae})


@register_sae("matryoshka")
class MatryoshkaSAE(BatchThresholdMixin, TopKFamilySAE):
    config_class = MatryoshkaSAEConfig
    cfg: MatryoshkaSAEConfig

    def __init__(self, cfg: MatryoshkaSAEConfig):
        super().__init__(cfg)
        self.init_threshold()

    def select(self, scores_BL: torch.Tensor, ctx: StepContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        return select_batch_topk(scores_BL, self.current_k(ctx))

    def level_order(self) -> torch.Tensor | None:
        """Latent order defining the prefixes (None = index order). The recipe sorts by frequency."""
        return None

    def prefix_reconstructions(self, acts: SparseActs, W_unit_LD: torch.Tensor) -> list[torch.Tensor]:
        """Reconstruction from each inner prefix [0, m_ℓ), ℓ = 1..levels−1.

        The outer level is the full reconstruction, which train_forward already has. Each active
        entry is added once, into the first level that contains it, then levels are accumulated."""
        widths = self.cfg.matryoshka_widths
        rank_L = self.level_order()
        position_N = acts.latent_idx if rank_L is None else rank_L[acts.latent_idx]
        level_N = torch.bucketize(position_N, torch.tensor(widths, device=position_N.device), right=True)
        partial_BD = self.b_dec_D
        recons = []
        for level in range(len(widths) - 1):
            partial_BD = partial_BD + acts.decode_rows(W_unit_LD, mask=level_N == level)
            recons.append(partial_BD)
        return recons

    def extra_losses(self, x_s_BD, x_tilde_BD, hidden_pre_BL, scores_BL, acts, W_unit_LD, ctx):
        recons = self.prefix_reconstructions(acts, W_unit_LD)
        self._inner_recons = recons  # reused by the per-level aux loss of this step
        widths = self.cfg.matryoshka_widths
        return {
            f"mse_{w}": m * mse_per_sample(r, x_s_BD).mean()
            for w, r, m in zip(widths[:-1], recons, self.cfg.inner_multipliers())
        }

    def aux_loss(self, x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, ctx):
        if not self.cfg.use_matryoshka_aux_loss:
            return super().aux_loss(x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, ctx)
        if ctx.dead_mask_L is None or self.cfg.aux_loss_coefficient == 0:
            return None
        # Per level: the level's own dead latents reconstruct the residual of its prefix.
        zero = x_s_BD.new_tensor(0.0)
        total = zero
        start = 0
        rank_L = self.level_order()
        for width, recon_BD in zip(self.cfg.matryoshka_widths, self._inner_recons + [x_hat_BD]):
            in_level_L = torch.zeros(self.d_sae, dtype=torch.bool, device=ctx.dead_mask_L.device)
            if rank_L is None:
                in_level_L[start:width] = True
            else:
                in_level_L = (rank_L >= start) & (rank_L < width)
            total = total + self.aux_k_loss(
                x_s_BD - recon_BD.detach(),
                x_tilde_BD,
                hidden_pre_BL,
                scores_BL,
                W_unit_LD,
                ctx.dead_mask_L & in_level_L,
                zero,
            )
            start = width
        return total
