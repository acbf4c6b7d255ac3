"""Standard SAE: ReLU encoder, L1 penalty weighted by decoder norms (SAELens `standard`).

    f = ReLU(x̃ W_enc + b_enc),   x̂ = f W_dec + b_dec
    loss = Σ_d (x̂ − x)²  (batch mean)  +  λ · mean_b ‖f ⊙ ‖W_dec‖‖_p

The decoder is not constrained to unit norm; its row norms are multiplied into the penalty instead,
so shrinking a decoder row cannot buy a smaller penalty. λ ("l1") can be driven by the trainer's L0
autotuner when `target_l0` is set (SynthSAEBench's protocol starts it after a third of training).

Training takes a sparse path whenever few pre-activations are positive (the usual case once the
penalty bites): the encoder matmul runs without autograd and only the positive entries enter the
graph (`gather_pre_acts`), decoded from just their rows of W_dec. Entries with h ≤ 0 have f = 0 and
zero gradient everywhere, so this is the same loss and the same gradients as the dense path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import require
from saelab.saes.base import SAE, AutotuneTarget, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SPARSE_MAX_DENSITY, SparseActs, gather_pre_acts, per_sample_sum
from saelab.saes.registry import register_sae


def validate_autotune_fields(cfg: Any) -> None:
    """Checks shared by configs with `target_l0` / `autotune_start_fraction` (standard, jumprelu)."""
    target = cfg.target_l0
    require(
        target is None or (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= cfg.d_sae),
        "target_l0",
        target,
        f"must be None or a number in (0, d_sae={cfg.d_sae}]",
    )
    frac = cfg.autotune_start_fraction
    require(0.0 <= frac < 1.0, "autotune_start_fraction", frac, "must be in [0, 1)")


def require_non_negative(name: str, value: Any) -> None:
    require(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
        name,
        value,
        "must be a finite number ≥ 0",
    )


def require_steps(name: str, value: Any) -> None:
    require(isinstance(value, int) and value >= 0, name, value, "must be an integer ≥ 0")


@dataclass(kw_only=True)
class StandardSAEConfig(SAEConfig):
    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    # L0 autotuning (SynthSAEBench): the trainer scales "l1" to steer the mean L0 to this target.
    target_l0: float | None = None
    autotune_start_fraction: float = 0.0

    def validate(self) -> None:
        super().validate()
        require_non_negative("l1_coefficient", self.l1_coefficient)
        require(
            isinstance(self.lp_norm, (int, float)) and math.isfinite(self.lp_norm) and self.lp_norm > 0,
            "lp_norm",
            self.lp_norm,
            "must be a finite number > 0",
        )
        require_steps("l1_warm_up_steps", self.l1_warm_up_steps)
        validate_autotune_fields(self)


@register_sae("standard")
class StandardSAE(SAE):
    config_class = StandardSAEConfig
    cfg: StandardSAEConfig
    supports_transcoder = True

    def autotune_target(self) -> AutotuneTarget | None:
        """The autotuner scales "l1" toward `cfg.target_l0` (when set)."""
        if self.cfg.target_l0 is None:
            return None
        return AutotuneTarget("l1", float(self.cfg.target_l0), float(self.cfg.autotune_start_fraction))

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any) -> StandardSAEConfig:
        """SynthSAEBench: λ = 2 warmed up over the first third, then autotuned toward `l0`."""
        return StandardSAEConfig(
            **{
                "d_in": d_in,
                "d_sae": d_sae,
                "l1_coefficient": 2.0,
                "l1_warm_up_steps": total_steps // 3,
                "target_l0": l0,
                "autotune_start_fraction": 1 / 3,
                **overrides,
            }
        )

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def coefficient_names(self) -> dict[str, tuple[float, int]]:
        return {"l1": (self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}

    def sparsity_loss(self, acts_BL: torch.Tensor, l1_coefficient: float) -> torch.Tensor:
        """λ · mean_b ‖f ⊙ ‖W_dec‖‖_p."""
        W_dec_norm_L = self.W_dec_LD.norm(dim=1)
        per_sample_B = (acts_BL * W_dec_norm_L).norm(p=self.cfg.lp_norm, dim=-1)
        return l1_coefficient * per_sample_B.mean()

    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        target_BD = self.loss_target(x_BD, ctx)  # scaled units, as in SAELens (a transcoder's s·y − skip)
        # Without a coefficient from the trainer (direct use), the configured final value applies.
        l1_coefficient = ctx.coefficients.get("l1", self.cfg.l1_coefficient)
        # One encoder matmul serves both paths: the sparse one reads it detached, so its graph is never used.
        x_tilde_BD = self.process_input(x_BD)
        hidden_pre_BL = x_tilde_BD @ self.W_enc_DL + self.b_enc_L
        if self.cfg.lp_norm == 1:
            active_BL = hidden_pre_BL.detach() > 0
            if int(active_BL.sum()) <= SPARSE_MAX_DENSITY * active_BL.numel():
                return self._train_forward_sparse(
                    x_tilde_BD.detach(), hidden_pre_BL.detach(), active_BL, target_BD, l1_coefficient
                )
        acts_BL = torch.relu(hidden_pre_BL)
        x_hat_BD = self.reconstruct(acts_BL)
        losses = {
            "mse": mse_per_sample(x_hat_BD, target_BD).mean(),
            "l1": self.sparsity_loss(acts_BL, l1_coefficient),
        }
        return StepOutput.from_dense_acts(losses, x_hat_BD, acts_BL)

    def _train_forward_sparse(self, x_tilde_BD, hidden_pre_BL, active_BL, target_BD, l1_coefficient) -> StepOutput:
        """The dense step's loss and gradients, computed on the positive pre-activations only (L1 case)."""
        B = hidden_pre_BL.shape[0]
        batch_idx, latent_idx = active_BL.nonzero(as_tuple=True)  # sample-major, as SparseActs needs
        acts_N = gather_pre_acts(self, x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)  # all > 0: ReLU is identity
        acts = SparseActs(batch_idx, latent_idx, acts_N, B, self.d_sae)
        x_hat_BD = self.reconstruct_sparse(acts)
        W_dec_norm_N = self.W_dec_LD.norm(dim=1)[latent_idx]
        l1_B = per_sample_sum(acts_N * W_dec_norm_N, batch_idx, B)
        losses = {
            "mse": mse_per_sample(x_hat_BD, target_BD).mean(),
            "l1": l1_coefficient * l1_B.mean(),
        }
        return StepOutput(
            loss=losses["mse"] + losses["l1"],
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=torch.tensor(batch_idx.numel() / max(B, 1)),
            fired_L=active_BL.any(dim=0),
        )
