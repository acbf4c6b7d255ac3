"""BatchTopK SAE (Bussmann et al. 2024): the k·B largest activations of the whole batch fire.

Training keeps a running global threshold; the inference SAE is a JumpReLU with that threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.errors import require
from saelab.saes.base import StepContext
from saelab.saes.registry import register_sae
from saelab.saes.topk_family import BatchThresholdMixin, TopKFamilyConfig, TopKFamilySAE, select_batch_topk


@dataclass(kw_only=True)
class BatchTopKSAEConfig(TopKFamilyConfig):
    k: float = 100
    topk_threshold_lr: float = 0.01

    def validate(self) -> None:
        super().validate()
        require(0 < self.topk_threshold_lr <= 1, "topk_threshold_lr", self.topk_threshold_lr, "must be in (0, 1]")


@register_sae("batchtopk")
class BatchTopKSAE(BatchThresholdMixin, TopKFamilySAE):
    config_class = BatchTopKSAEConfig
    cfg: BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig):
        super().__init__(cfg)
        self.init_threshold()

    def select(self, scores_BL: torch.Tensor, ctx: StepContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        return select_batch_topk(scores_BL, self.current_k(ctx))
