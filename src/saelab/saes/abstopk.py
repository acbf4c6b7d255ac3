"""AbsTopK SAE ("AbsTopK: Rethinking Sparse Autoencoders For Bidirectional Features", ICLR 2026,
arXiv:2510.00404; SAELens `abstopk`): each sample keeps the k pre-activations of largest magnitude, with
their signs, so one latent can fire in either direction along its decoder row.

    h = (x̃ W_enc + b_enc) ⊙ ‖W_dec‖,   f = h on the k largest |h| of each sample (no ReLU), else 0

Everything else is saelab's TopK (`topk_family`): the sparse training path, decoding with the
unit-norm decoder, and AuxK on dead latents, which here picks the dead latents of largest |h| and
keeps their signed values (SAELens's `calculate_abstopk_aux_acts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.saes.base import StepContext
from saelab.saes.registry import register_sae
from saelab.saes.topk import TopKSAE, TopKSAEConfig
from saelab.saes.topk_family import select_topk


@dataclass(kw_only=True)
class AbsTopKSAEConfig(TopKSAEConfig):
    """TopK's fields (k, aux_loss_coefficient, rescale_acts_by_decoder_norm), as SAELens's."""


@register_sae("abstopk")
class AbsTopKSAE(TopKSAE):
    config_class = AbsTopKSAEConfig
    cfg: AbsTopKSAEConfig

    def select(self, scores_BL: torch.Tensor, ctx: StepContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Ranked by |h|; callers read the signed h at these entries.
        return select_topk(scores_BL.abs(), int(self.cfg.k))

    def aux_loss(self, x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, ctx) -> torch.Tensor | None:
        # AuxK ranks dead latents by `scores_BL` and gathers their signed values: rank by |h| here.
        return super().aux_loss(x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL.abs(), W_unit_LD, ctx)
