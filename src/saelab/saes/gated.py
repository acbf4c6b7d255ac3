"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs"; SAELens `gated`).

Which latents fire and how strongly are decided by two paths sharing one encoder matrix:

    π_gate = x̃ W_enc + b_gate                 f = 1[π_gate > 0] ⊙ ReLU(π_mag)
    π_mag  = x̃ (W_enc ⊙ exp(r_mag)) + b_mag    x̂ = f W_dec + b_dec

    loss = Σ_d (x̂ − x)²  +  λ · Σ_i ReLU(π_gate)_i ‖W_dec,i‖  +  Σ_d (ReLU(π_gate) W_aux + b_aux − x)²

(each term a batch mean). The step 1[π_gate > 0] has no gradient, so the gate learns only from the
L1 penalty and the auxiliary reconstruction, which decodes ReLU(π_gate) itself. Two loss variants
(`gated_loss`), each exactly one reference:

  saelens  (default) SAELens's `GatedTrainingSAE`: free decoder norms, the L1 weighted by them, and the
           auxiliary term decoding through the live decoder (W_aux, b_aux = W_dec, b_dec).
  paper    the paper: decoder rows held at unit norm (training decodes with W_dec/‖W_dec‖, so the
           gradient has no component along a row, and rows are renormalised after every step), so the
           L1 weight is 1; the auxiliary term decodes through a frozen copy (W_dec, b_dec detached),
           so it trains the gate, not the decoder.

The frozen copy needs the unit-norm constraint: with free norms, the L1's gradient shrinks ‖W_dec‖
unopposed and the magnitude path compensates, so the penalty stops biting (measured on synth-mini,
width 256, lr 2e-3, 300k samples: L0 stuck at 140 for a target of 12 while ‖W_dec‖ fell from 0.1 to
0.07; SAELens's variant reached L0 63 and falling, explained variance 0.77).
λ ("l1") can be driven by the trainer's L0 autotuner (`target_l0`).

The gate bias b_gate is stored as the base class's `b_enc_L` (its role there: `pre_acts` is π_gate),
and is written to disk under SAELens's name "b_gate"; SAELens's gated SAE has no `b_enc`.

Training takes a sparse path whenever few gates are open (the usual case once the penalty bites):
the encoder matmul runs without autograd and only entries with π_gate > 0 enter the graph
(`gather_matmul`), decoded from just their rows of W_dec. Where π_gate ≤ 0 every term is 0 with zero
gradient (f = 0 through the step, ReLU(π_gate) = 0), so the loss and gradients are the dense step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from saelab.errors import require
from saelab.saes.base import SAE, AutotuneTarget, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SPARSE_MAX_DENSITY, SparseActs, gather_matmul, per_sample_sum
from saelab.saes.registry import register_sae
from saelab.saes.standard import require_non_negative, require_steps, validate_autotune_fields

GatedLoss = Literal["saelens", "paper"]
_GATED_LOSSES = ("saelens", "paper")


@dataclass(kw_only=True)
class GatedSAEConfig(SAEConfig):
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    # "saelens": SAELens's GatedTrainingSAE; "paper": unit-norm decoder, frozen decoder in the auxiliary loss.
    gated_loss: GatedLoss = "saelens"
    # L0 autotuning: the trainer scales "l1" to steer the mean L0 (latents with f ≠ 0) to this target.
    target_l0: float | None = None
    autotune_start_fraction: float = 0.0

    def validate(self) -> None:
        super().validate()
        require_non_negative("l1_coefficient", self.l1_coefficient)
        require_steps("l1_warm_up_steps", self.l1_warm_up_steps)
        require(
            self.gated_loss in _GATED_LOSSES, "gated_loss", self.gated_loss, f"must be one of {list(_GATED_LOSSES)}"
        )
        validate_autotune_fields(self)


@register_sae("gated")
class GatedSAE(SAE):
    config_class: ClassVar[type[GatedSAEConfig]] = GatedSAEConfig
    cfg: GatedSAEConfig
    # SAELens's GatedSAE tensors; b_gate is held in b_enc_L (see the module docstring).
    saelens_names = {
        "W_enc": "W_enc_DL",
        "b_gate": "b_enc_L",
        "r_mag": "r_mag_L",
        "b_mag": "b_mag_L",
        "W_dec": "W_dec_LD",
        "b_dec": "b_dec_D",
    }

    def __init__(self, cfg: GatedSAEConfig):
        super().__init__(cfg)
        dtype, device = self.W_enc_DL.dtype, self.W_enc_DL.device
        self.r_mag_L = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_mag_L = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))

    @property
    def b_gate_L(self) -> torch.Tensor:
        """The gate bias (the same parameter as `b_enc_L`)."""
        return self.b_enc_L

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """SAELens init: the base weights, b_gate = r_mag = b_mag = 0 ("paper": unit-norm decoder rows)."""
        super().reset_parameters(generator)
        if self.cfg.gated_loss == "paper":
            self.normalize_decoder()
        if "r_mag_L" in self._parameters:  # absent while the base constructor runs
            with torch.no_grad():
                self.r_mag_L.zero_()
                self.b_mag_L.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # On .data (as JumpReLU's threshold clamp): the version counter stays, so a graph built
        # before the projection can still be backpropagated.
        W_LD = self.W_dec_LD.data
        W_LD.div_(W_LD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def after_step(self) -> None:
        if self.cfg.gated_loss == "paper":
            self.normalize_decoder()

    def autotune_target(self) -> AutotuneTarget | None:
        """The autotuner scales "l1" toward `cfg.target_l0` (when set)."""
        if self.cfg.target_l0 is None:
            return None
        return AutotuneTarget("l1", float(self.cfg.target_l0), float(self.cfg.autotune_start_fraction))

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any) -> GatedSAEConfig:
        """As saelab's standard SAE (SynthSAEBench's penalty protocol): λ warmed up over the first
        third, then autotuned toward `l0`."""
        return GatedSAEConfig(
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

    # ----- inference --------------------------------------------------------------------------
    def magnitude_pre_acts(self, xw_BL: torch.Tensor) -> torch.Tensor:
        """π_mag from x̃ W_enc (the product both paths share)."""
        return xw_BL * self.r_mag_L.exp() + self.b_mag_L

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        xw_BL = self.process_input(x_BD) @ self.W_enc_DL
        open_BL = (xw_BL + self.b_enc_L) > 0
        return open_BL.to(xw_BL.dtype) * torch.relu(self.magnitude_pre_acts(xw_BL))

    # ----- training ---------------------------------------------------------------------------
    def coefficient_names(self) -> dict[str, tuple[float, int]]:
        return {"l1": (self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}

    def training_decoders(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """(W_dec as the main reconstruction uses it, the L1's per-latent weights (None: all 1),
        (W_aux, b_aux) of the auxiliary reconstruction) for the configured loss variant."""
        if self.cfg.gated_loss == "paper":
            # Unit rows in the graph: their gradient is the row-orthogonal part, as the paper's projection.
            W_unit_LD = self.W_dec_LD / self.W_dec_LD.norm(dim=1, keepdim=True)
            return W_unit_LD, None, (W_unit_LD.detach(), self.b_dec_D.detach())
        return self.W_dec_LD, self.W_dec_LD.norm(dim=1), (self.W_dec_LD, self.b_dec_D)

    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        target_BD = self.scale_input(x_BD)  # losses live in scaled units, as in SAELens
        l1_coefficient = ctx.coefficients.get("l1", self.cfg.l1_coefficient)
        # One encoder matmul serves both paths: the sparse one reads it detached, so its graph is never used.
        x_tilde_BD = self.process_input(x_BD)
        xw_BL = x_tilde_BD @ self.W_enc_DL
        pi_gate_BL = xw_BL + self.b_enc_L
        open_BL = pi_gate_BL.detach() > 0
        if int(open_BL.sum()) <= SPARSE_MAX_DENSITY * open_BL.numel():
            return self._train_forward_sparse(x_tilde_BD, xw_BL.detach(), open_BL, target_BD, l1_coefficient)
        W_dec_LD, l1_weight_L, (W_aux_LD, b_aux_D) = self.training_decoders()
        acts_BL = open_BL.to(xw_BL.dtype) * torch.relu(self.magnitude_pre_acts(xw_BL))
        x_hat_BD = acts_BL @ W_dec_LD + self.b_dec_D
        gate_acts_BL = torch.relu(pi_gate_BL)
        weighted_BL = gate_acts_BL if l1_weight_L is None else gate_acts_BL * l1_weight_L
        losses = {
            "mse": mse_per_sample(x_hat_BD, target_BD).mean(),
            "l1": l1_coefficient * weighted_BL.sum(dim=-1).mean(),
            "aux": mse_per_sample(gate_acts_BL @ W_aux_LD + b_aux_D, target_BD).mean(),
        }
        return StepOutput.from_dense_acts(losses, x_hat_BD, acts_BL)

    def _train_forward_sparse(self, x_tilde_BD, xw_BL, open_BL, target_BD, l1_coefficient) -> StepOutput:
        """The dense step's loss and gradients, computed on the open gates (π_gate > 0) only."""
        B = xw_BL.shape[0]
        batch_idx, latent_idx = open_BL.nonzero(as_tuple=True)  # sample-major, as SparseActs needs
        # x̃ keeps its graph (b_dec's gradient flows through it); the product is read from xw_BL.
        xw_N = gather_matmul(x_tilde_BD, self.W_enc_DL, xw_BL, batch_idx, latent_idx)
        gate_N = xw_N + self.b_enc_L[latent_idx]  # all > 0: ReLU is identity
        mag_N = xw_N * self.r_mag_L.exp()[latent_idx] + self.b_mag_L[latent_idx]
        W_dec_LD, l1_weight_L, (W_aux_LD, b_aux_D) = self.training_decoders()
        acts = SparseActs(batch_idx, latent_idx, torch.relu(mag_N), B, self.d_sae)
        x_hat_BD = self.reconstruct_sparse(acts, W_dec_LD)
        gate_acts = SparseActs(batch_idx, latent_idx, gate_N, B, self.d_sae)
        weighted_N = gate_N if l1_weight_L is None else gate_N * l1_weight_L[latent_idx]
        losses = {
            "mse": mse_per_sample(x_hat_BD, target_BD).mean(),
            "l1": l1_coefficient * per_sample_sum(weighted_N, batch_idx, B).mean(),
            "aux": mse_per_sample(gate_acts.decode_rows(W_aux_LD) + b_aux_D, target_BD).mean(),
        }
        with torch.no_grad():
            l0 = (acts.values != 0).sum().float() / max(B, 1)
        return StepOutput(
            loss=losses["mse"] + losses["l1"] + losses["aux"],
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=l0,
            fired_L=acts.fired_L(),
        )

    # ----- weight surgery ---------------------------------------------------------------------
    @torch.no_grad()
    def _fold_W_dec_norm_extra(self, norms_L: torch.Tensor) -> None:
        # Both pre-activations scale with the encoder columns (b_gate is b_enc, already scaled);
        # r_mag multiplies W_enc, so it needs no change (as SAELens's fold_W_dec_norm).
        self.b_mag_L.mul_(norms_L)

    # The input scale needs no change here: fold_input_scale keeps x̃ W_enc unchanged, so both paths are.
