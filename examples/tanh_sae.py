"""A new architecture in one file: ReLU SAE with Anthropic's tanh sparsity penalty.

Benchmark it without editing saelab:

    PYTHONPATH=examples saelab bench --protocol mini --arch tanh_sae:TanhSAE

The class implements the SAE protocol (encode, train_forward, config_for_l0) and registers itself;
the trainer's L0 autotuner steers its penalty coefficient toward the requested L0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.saes import SAE, AutotuneTarget, SAEConfig, StepContext, StepOutput, register_sae
from saelab.saes.base import mse_per_sample


@dataclass(kw_only=True)
class TanhSAEConfig(SAEConfig):
    tanh_coefficient: float = 1.0
    tanh_scale: float = 4.0
    target_l0: float | None = None


@register_sae("tanh_relu")
class TanhSAE(SAE):
    config_class = TanhSAEConfig

    @classmethod
    def config_for_l0(cls, d_in, d_sae, l0, total_steps, **overrides):
        return TanhSAEConfig(**{"d_in": d_in, "d_sae": d_sae, "target_l0": l0, **overrides})

    def autotune_target(self) -> AutotuneTarget | None:
        return None if self.cfg.target_l0 is None else AutotuneTarget("tanh", self.cfg.target_l0)

    def coefficient_names(self):
        return {"tanh": (self.cfg.tanh_coefficient, 0)}

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        acts_BL = self.encode(x_BD)
        x_hat_BD = self.reconstruct(acts_BL)
        mse = mse_per_sample(x_hat_BD, self.scale_input(x_BD)).mean()
        penalty = torch.tanh(self.cfg.tanh_scale * acts_BL * self.W_dec_LD.norm(dim=1)).sum(-1).mean()
        losses = {"mse": mse, "tanh": ctx.coefficients["tanh"] * penalty}
        fired_BL = acts_BL > 0
        return StepOutput(
            loss=mse + losses["tanh"],
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=fired_BL.sum(-1).float().mean().detach(),
            fired_L=fired_BL.any(0),
        )
