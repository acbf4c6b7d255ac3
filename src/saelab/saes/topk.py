"""TopK SAE (Gao et al. 2024): each sample keeps its k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import require
from saelab.saes.base import StepContext
from saelab.saes.registry import register_sae
from saelab.saes.topk_family import TopKFamilyConfig, TopKFamilySAE, select_topk


@dataclass(kw_only=True)
class TopKSAEConfig(TopKFamilyConfig):
    k: int = 100

    def validate(self) -> None:
        super().validate()
        require(float(self.k).is_integer(), "k", self.k, "must be an integer for TopK (use batchtopk for a mean k)")


@register_sae("topk")
class TopKSAE(TopKFamilySAE):
    config_class = TopKSAEConfig
    cfg: TopKSAEConfig

    def select(self, scores_BL: torch.Tensor, ctx: StepContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        return select_topk(scores_BL, int(self.cfg.k))

    def saelens_config(self) -> dict[str, Any]:
        return {"k": int(self.cfg.k), "rescale_acts_by_decoder_norm": self.cfg.rescale_acts_by_decoder_norm}
