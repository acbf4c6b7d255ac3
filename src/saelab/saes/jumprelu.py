"""JumpReLU SAE (SAELens `jumprelu`): per-latent thresholds trained with straight-through estimators.

    h = x̃ W_enc + b_enc,   f = h · 1[h > θ]   (θ ≥ 0, so this equals ReLU(h)·1[h > θ])

The jump is not differentiable in θ, so θ gets a rectangle-kernel pseudo-derivative of bandwidth ε
(Rajamanoharan et al. 2024): ∂f/∂θ ≈ −(θ/ε)·1[|h − θ| < ε/2]. DeepMind sends that estimate to θ
only; Anthropic (Jan 2025; `jumprelu_ste_to_input=True`) also sends it to h, and so to the encoder.

Sparsity losses (`jumprelu_sparsity_loss_mode`), all averaged over the batch and scaled by λ ("l0"):
  step       Σ_i H(h_i − θ_i)                      DeepMind L0, via the Step STE
  tanh       Σ_i tanh(c · f_i · ‖W_dec,i‖)         Anthropic
  quadratic  (2/L0*) · (Σ_i H(h_i − θ_i) − L0*)²  Gemma Scope 2, L0* = target_l0
Optional Anthropic pre-activation loss ("pre_act"): Σ_i ReLU(θ_i − h_i)·‖W_dec,i‖ over latents the
trainer reports dead only (SAELens's deliberate deviation, PR #541).

Training takes a sparse path when few entries matter (the usual case at a benchmark L0): every
entry with h ≤ θ − ε/2 has f = 0, zero gradient and zero step-loss gradient, so only the active
entries and those inside the STE band enter the graph (`gather_pre_acts`, rows of W_dec), giving the
dense path's loss and gradients at a fraction of its matmuls. The pre-activation loss touches every
entry of dead latents, so with it the dense path is used.

θ is parameterised directly (not as exp(log θ): Adam's ~lr steps barely move a log-threshold) and
kept in float32 whatever the SAE dtype (lr-sized steps on an O(1) threshold round away in bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from saelab.errors import require
from saelab.saes.base import SAE, AutotuneTarget, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SPARSE_MAX_DENSITY, SparseActs, gather_pre_acts, per_sample_sum
from saelab.saes.registry import register_sae
from saelab.saes.standard import require_non_negative, require_steps, validate_autotune_fields

SparsityLossMode = Literal["step", "tanh", "quadratic"]
_LOSS_MODES = ("step", "tanh", "quadratic")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The STE kernel: 1 on the open interval (−½, ½), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient (e.g. [B, L]) back to a parameter's shape (e.g. [L])."""
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim=dim, keepdim=True)
    return grad


class JumpReLUFunction(torch.autograd.Function):
    """f = x·1[x > θ]; ∂f/∂x = 1[x > θ] (+ (θ/ε)·rect((x−θ)/ε) with ste_to_input); ∂f/∂θ = −(θ/ε)·rect."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, ste_to_input: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (threshold / eps) * rectangle((x - threshold) / eps) * grad_out
        x_grad = (x > threshold).to(grad_out.dtype) * grad_out
        if ctx.ste_to_input:
            # f jumps by θ at x = θ; the smoothed jump's slope reaches x with the opposite sign to θ.
            x_grad = x_grad + ste
        threshold_grad = _sum_to_shape(-ste, threshold.shape) if ctx.needs_input_grad[1] else None
        return x_grad, threshold_grad, None, None


class StepFunction(torch.autograd.Function):
    """H(x − θ); ∂H/∂θ = −(1/ε)·rect((x−θ)/ε); ∂H/∂x = +(1/ε)·rect(·) with ste_to_input, else 0."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, ste_to_input: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (1.0 / eps) * rectangle((x - threshold) / eps) * grad_out
        # H depends on x only through x − θ, so its gradient wrt x is minus that wrt θ.
        x_grad = ste if ctx.ste_to_input else None
        threshold_grad = _sum_to_shape(-ste, threshold.shape) if ctx.needs_input_grad[1] else None
        return x_grad, threshold_grad, None, None


def jumprelu(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, ste_to_input: bool = False) -> torch.Tensor:
    return JumpReLUFunction.apply(x, threshold, bandwidth, ste_to_input)


def step(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float, ste_to_input: bool = False) -> torch.Tensor:
    return StepFunction.apply(x, threshold, bandwidth, ste_to_input)


@dataclass(kw_only=True)
class JumpReLUSAEConfig(SAEConfig):
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: SparsityLossMode = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None  # 3e-6 = Anthropic; applied to dead latents only
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False  # True = Anthropic: STE gradients also reach the encoder
    # "quadratic": the loss's target L0 (required). "step"/"tanh": the L0 autotuner's target (optional).
    target_l0: float | None = None
    autotune_start_fraction: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(
            self.jumprelu_sparsity_loss_mode in _LOSS_MODES,
            "jumprelu_sparsity_loss_mode",
            self.jumprelu_sparsity_loss_mode,
            f"must be one of {list(_LOSS_MODES)}",
        )
        require_non_negative("jumprelu_init_threshold", self.jumprelu_init_threshold)
        require(
            isinstance(self.jumprelu_bandwidth, (int, float))
            and math.isfinite(self.jumprelu_bandwidth)
            and self.jumprelu_bandwidth > 0,
            "jumprelu_bandwidth",
            self.jumprelu_bandwidth,
            "must be a finite number > 0",
        )
        require_non_negative("l0_coefficient", self.l0_coefficient)
        require_steps("l0_warm_up_steps", self.l0_warm_up_steps)
        if self.pre_act_loss_coefficient is not None:
            require_non_negative("pre_act_loss_coefficient", self.pre_act_loss_coefficient)
        require(
            isinstance(self.jumprelu_tanh_scale, (int, float))
            and math.isfinite(self.jumprelu_tanh_scale)
            and self.jumprelu_tanh_scale > 0,
            "jumprelu_tanh_scale",
            self.jumprelu_tanh_scale,
            "must be a finite number > 0",
        )
        require(
            self.jumprelu_sparsity_loss_mode != "quadratic" or self.target_l0 is not None,
            "target_l0",
            self.target_l0,
            "must be set when jumprelu_sparsity_loss_mode='quadratic'",
        )
        validate_autotune_fields(self)


@register_sae("jumprelu")
class JumpReLUSAE(SAE):
    config_class: ClassVar[type[JumpReLUSAEConfig]] = JumpReLUSAEConfig
    cfg: JumpReLUSAEConfig
    saelens_names = {**SAE.saelens_names, "threshold": "threshold_L"}
    supports_transcoder = True

    def __init__(self, cfg: JumpReLUSAEConfig):
        super().__init__(cfg)
        self.threshold_L = nn.Parameter(
            torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold), dtype=torch.float32, device=cfg.device)
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if "threshold_L" in self._parameters:  # absent while the base constructor runs
            with torch.no_grad():
                self.threshold_L.fill_(float(self.cfg.jumprelu_init_threshold))

    def _apply(self, fn, *args: Any, **kwargs: Any):
        out = super()._apply(fn, *args, **kwargs)
        # .to(dtype) casts every float parameter; restore the float32 invariant of the threshold.
        threshold = self._parameters.get("threshold_L")
        if threshold is not None and threshold.dtype != torch.float32:
            threshold.data = threshold.data.float()
        return out

    def autotune_target(self) -> AutotuneTarget | None:
        """The autotuner scales "l0" toward `cfg.target_l0`; the quadratic loss steers L0 itself."""
        if self.cfg.target_l0 is None or self.cfg.jumprelu_sparsity_loss_mode == "quadratic":
            return None
        return AutotuneTarget("l0", float(self.cfg.target_l0), float(self.cfg.autotune_start_fraction))

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any) -> JumpReLUSAEConfig:
        """SynthSAEBench (DeepMind step loss since 2026-04): λ = 1 autotuned toward `l0` from step 0."""
        return JumpReLUSAEConfig(
            **{
                "d_in": d_in,
                "d_sae": d_sae,
                "normalize_activations": "expected_average_only_in",
                "jumprelu_sparsity_loss_mode": "step",
                "jumprelu_bandwidth": 1.0,
                "jumprelu_init_threshold": 1.0,
                "decoder_init_norm": 0.5,
                "l0_coefficient": 1.0,
                "l0_warm_up_steps": 0,
                "target_l0": l0,
                "autotune_start_fraction": 0.0,
                **overrides,
            }
        )

    # ----- inference --------------------------------------------------------------------------
    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        hidden_pre_BL = self.pre_acts(x_BD)
        threshold_L = self.threshold_L.to(hidden_pre_BL.dtype)
        return torch.relu(hidden_pre_BL) * (hidden_pre_BL > threshold_L).to(hidden_pre_BL.dtype)

    # ----- training ---------------------------------------------------------------------------
    def coefficient_names(self) -> dict[str, tuple[float, int]]:
        names = {"l0": (self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps)}
        if self.cfg.pre_act_loss_coefficient is not None:
            names["pre_act"] = (self.cfg.pre_act_loss_coefficient, 0)
        return names

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        # Projected on .data, not clamped in the graph: a graph clamp would zero θ's gradient and
        # pin any latent whose threshold reached 0 there for good. Via .data the version counter is
        # untouched, so a graph built earlier (gradient accumulation) can still be backpropagated.
        self.threshold_L.data.clamp_(min=0.0)

    def after_step(self) -> None:
        self.clamp_threshold()

    def sparsity_losses(
        self,
        hidden_pre_BL: torch.Tensor,
        acts_BL: torch.Tensor,
        coefficients: dict[str, float],
        dead_mask_L: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        threshold_L = self.threshold_L.to(hidden_pre_BL.dtype)
        W_dec_norm_L = self.W_dec_LD.norm(dim=1)
        per_sample_B = self._sparsity_per_sample(
            hidden_pre_BL, acts_BL, threshold_L, W_dec_norm_L, lambda t: t.sum(dim=-1)
        )
        losses = {"l0": coefficients.get("l0", self.cfg.l0_coefficient) * per_sample_B.mean()}
        if self.cfg.pre_act_loss_coefficient is not None:
            coefficient = coefficients.get("pre_act", self.cfg.pre_act_loss_coefficient)
            losses["pre_act"] = self.pre_act_loss(hidden_pre_BL, threshold_L, W_dec_norm_L, dead_mask_L, coefficient)
        return losses

    def _sparsity_per_sample(self, hidden_pre, acts, threshold, W_dec_norm, row_sum) -> torch.Tensor:
        """The per-sample sparsity penalty (before λ). Works on [B, L] tensors with `row_sum` = sum over
        latents, or on flat entries (threshold and norms gathered per entry) with a per-sample sum."""
        cfg = self.cfg
        mode = cfg.jumprelu_sparsity_loss_mode
        if mode == "tanh":
            return row_sum(torch.tanh(cfg.jumprelu_tanh_scale * acts * W_dec_norm))
        l0_B = row_sum(step(hidden_pre, threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input))
        if mode == "quadratic":
            assert cfg.target_l0 is not None  # validated non-None for this mode
            target = float(cfg.target_l0)
            return (2.0 / target) * (l0_B - target) ** 2
        return l0_B

    @staticmethod
    def pre_act_loss(
        hidden_pre_BL: torch.Tensor,
        threshold_L: torch.Tensor,
        W_dec_norm_L: torch.Tensor,
        dead_mask_L: torch.Tensor | None,
        coefficient: float,
    ) -> torch.Tensor:
        """coefficient · mean_b Σ_i ReLU(θ_i − h_i)·dead_i·‖W_dec,i‖: pulls dead latents' pre-acts up."""
        if dead_mask_L is None or not bool(dead_mask_L.any()):
            return hidden_pre_BL.new_zeros(())
        dead_L = dead_mask_L.to(hidden_pre_BL.dtype)
        per_sample_B = ((threshold_L - hidden_pre_BL).relu() * (dead_L * W_dec_norm_L)).sum(dim=-1)
        return coefficient * per_sample_B.mean()

    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.clamp_threshold()  # also before the forward: a loaded or hand-set θ may be negative
        target_BD = self.loss_target(x_BD, ctx)  # s·x; a transcoder's s·y − skip
        # One encoder matmul serves both paths: the sparse one reads it detached, so its graph is never used.
        x_tilde_BD = self.process_input(x_BD)
        hidden_pre_BL = x_tilde_BD @ self.W_enc_DL + self.b_enc_L
        threshold_L = self.threshold_L.to(hidden_pre_BL.dtype)
        if self.cfg.pre_act_loss_coefficient is None:
            # Active, or inside the rectangle kernel's support |h − θ| < ε/2 (where θ gets gradient).
            entries_BL = hidden_pre_BL.detach() > threshold_L.detach() - 0.5 * self.cfg.jumprelu_bandwidth
            if int(entries_BL.sum()) <= SPARSE_MAX_DENSITY * entries_BL.numel():
                return self._train_forward_sparse(
                    x_tilde_BD.detach(), hidden_pre_BL.detach(), entries_BL, target_BD, ctx
                )
        acts_BL = jumprelu(hidden_pre_BL, threshold_L, self.cfg.jumprelu_bandwidth, self.cfg.jumprelu_ste_to_input)
        x_hat_BD = self.reconstruct(acts_BL)
        losses = {"mse": mse_per_sample(x_hat_BD, target_BD).mean()}
        losses.update(self.sparsity_losses(hidden_pre_BL, acts_BL, ctx.coefficients, ctx.dead_mask_L))
        return StepOutput.from_dense_acts(losses, x_hat_BD, acts_BL)

    def _train_forward_sparse(self, x_tilde_BD, hidden_pre_BL, entries_BL, target_BD, ctx) -> StepOutput:
        """The dense step's loss and gradients, from the active and in-band entries only."""
        B = hidden_pre_BL.shape[0]
        batch_idx, latent_idx = entries_BL.nonzero(as_tuple=True)  # sample-major, as SparseActs needs
        h_N = gather_pre_acts(self, x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)
        threshold_N = self.threshold_L.to(h_N.dtype)[latent_idx]
        acts_N = jumprelu(h_N, threshold_N, self.cfg.jumprelu_bandwidth, self.cfg.jumprelu_ste_to_input)
        acts = SparseActs(batch_idx, latent_idx, acts_N, B, self.d_sae)
        x_hat_BD = self.reconstruct_sparse(acts)
        W_dec_norm_N = self.W_dec_LD.norm(dim=1)[latent_idx]
        per_sample_B = self._sparsity_per_sample(
            h_N, acts_N, threshold_N, W_dec_norm_N, lambda t: per_sample_sum(t, batch_idx, B)
        )
        losses = {
            "mse": mse_per_sample(x_hat_BD, target_BD).mean(),
            "l0": ctx.coefficients.get("l0", self.cfg.l0_coefficient) * per_sample_B.mean(),
        }
        with torch.no_grad():
            l0 = (acts_N != 0).sum().float() / max(B, 1)
        return StepOutput(
            loss=losses["mse"] + losses["l0"],
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=l0,
            fired_L=acts.fired_L(),
        )

    # ----- weight surgery ---------------------------------------------------------------------
    @torch.no_grad()
    def _fold_W_dec_norm_extra(self, norms_L: torch.Tensor) -> None:
        # θ lives in pre-activation units, which scale with the encoder columns.
        self.threshold_L.mul_(norms_L.to(self.threshold_L.dtype))

    # The input scale needs no threshold change: fold_input_scale keeps pre-activations unchanged
    # (W_enc ← s·W_enc acting on x − b_dec/s), so θ stays in the same units.
