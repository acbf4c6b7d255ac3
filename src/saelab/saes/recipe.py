"""The SynthSAEBench "recipe" SAE (seed-posts §2.3–2.4). (The Multi-L0 SAE of §6.1 is in `multi_l0.py`.)

`recipe` is a Matryoshka BatchTopK SAE with every addition of Chanin's autoresearch run as an option:

* ISTA refinement (`ista_steps`, `ista_eta`, `learn_eta`). In rescaled units (n = ‖W_dec,j‖, U = W_dec/n):
      h⁰ = (x̃ W_enc + b_enc) ⊙ n,   z⁰ = BatchTopK_k(h⁰)
      rᵗ = x̃ − zᵗ U,   hᵗ⁺¹ = hᵗ + ηₜ (rᵗ W_enc) ⊙ n,   zᵗ⁺¹ = BatchTopK_k(hᵗ⁺¹)
      x̂ = z^T U + b_dec
  Every hᵗ is computed densely *without* autograd; only the selected entries enter the graph.
  Because the update is linear, hᵗ = (x̃ + Rₜ) W_enc + b_enc (then ⊙ n) with Rₜ = Σ_{τ<t} η_τ r^τ
  ([B, D], with grad), so the selected values of step t are
      gather_pre_acts(x̃ W_enc + b_enc)[sel] + gather_matmul(Rₜ, W_enc)[sel],   times n[sel]
  where `gather_matmul` (in `kernels`) is "(A @ W) at chosen entries" with an N·D backward. A step costs
  one dense B×D×L matmul (Rₜ W_enc) plus O(N·D) sparse work.
* Decreasing k (`k_initial`, `k_anneal_fraction`, `k_anneal_shape`): k_initial → k over that
  fraction of the run; fractional k is fine for BatchTopK.
* Frequency-sorted Matryoshka (`frequency_sort`, `frequency_ema`): an EMA of each latent's firing
  frequency (the first observed batch initialises it, as in the reference); prefix ℓ holds the
  most frequent latents.
* Detached inner levels (`detach_inner`): dec₀ = b_dec + slice₀, decₗ = detach(decₗ₋₁) + sliceₗ; the
  full-width MSE is computed separately and is never detached.
* TERM (`tilt`): each reconstruction MSE (full and inner; not AuxK) is Σ_b w_b ℓ_b with
  w = softmax_b(t·ℓ_b / mean ℓ), ℓ detached for the weights. t = 0 is the plain mean.
* `use_matryoshka=False` drops the inner levels (plain BatchTopK + the other options).
* Leave-one-out pruning at inference (`leave_one_out`, `loo_scale`; Bussmann, §2.4).
* OMP-style residual (`ista_residual="least_squares"`): each refinement step's residual is taken
  after the least-squares fit of x̃ on the current support (OMP's orthogonal projection,
  `least_squares_values`) instead of after the encoder's own codes; the support still comes from
  BatchTopK and the final codes stay the encoder's, so the encoder keeps its gradients (the fit's
  coefficients are treated as constants: no backward through the solve).
* K-SVD-style decoder updates (`ksvd_every`, `ksvd_rate`): every `ksvd_every` steps, after the
  optimiser step, each latent that fired in the batch moves its decoder direction towards the
  rank-one fit of its leave-j-out residual (one power iteration of approximate K-SVD, all atoms at
  once), keeping its norm.

Inference: per-step JumpReLU thresholds θ₀..θ_T (float64 buffer, EMA of each step's minimum
selected activation, as BatchTopK's single threshold is), see `encode`. With ista_steps = 0 and no
leave-one-out the inference SAE is a plain JumpReLU (SAELens-loadable); otherwise it stays a (folded)
`recipe` SAE, which saelab saves and loads but SAELens cannot.

Caveat on detach_inner with ISTA: the detach stops an inner loss from reaching earlier levels through
the *decoder sum*, but each refined code zᵀ_j depends on all step-0 codes through the residual, so an
inner loss still reaches other latents through the refinement chain (as in the reference code).

Registration: `saelab.saes.recipe` must be imported (or listed in
`saelab.saes.registry.BUILTIN_ARCHITECTURE_MODULES`) before `get_sae_class("recipe")` can find it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from saelab.errors import require
from saelab.saes.base import SAE, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SparseActs, gather_matmul, gather_pre_acts, least_squares_values
from saelab.saes.matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig, default_matryoshka_widths
from saelab.saes.registry import register_ablations, register_sae
from saelab.saes.topk_family import (
    BatchThresholdMixin,
    TopKFamilySAE,
    debiased_ema_update,
    default_missing_buffers,
    min_positive,
)

AnnealShape = Literal["linear", "cosine"]
IstaResidual = Literal["codes", "least_squares"]


def term_mean(per_sample_B: torch.Tensor, tilt: float) -> torch.Tensor:
    """Tilted ERM: Σ_b w_b ℓ_b, w = softmax_b(tilt · ℓ_b / mean ℓ) with ℓ detached; tilt 0 = mean."""
    if tilt == 0:
        return per_sample_B.mean()
    detached = per_sample_B.detach().to(torch.promote_types(per_sample_B.dtype, torch.float32))
    weights = torch.softmax(tilt * detached / detached.mean().clamp_min(1e-30), dim=0)
    return (weights.to(per_sample_B.dtype) * per_sample_B).sum()


# ----- recipe -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RecipeSAEConfig(MatryoshkaSAEConfig):
    ista_steps: int = 1
    ista_eta: float = 0.3
    learn_eta: bool = False
    ista_residual: IstaResidual = "codes"  # "least_squares": OMP-style orthogonal residual per step
    ls_ridge: float = (
        1e-4  # least-squares ridge; atoms are unit-norm in training, ‖W_dec,j‖ once folded (tiny either way)
    )
    k_initial: float | None = None
    k_anneal_fraction: float = 1.0
    k_anneal_shape: AnnealShape = "linear"
    frequency_sort: bool = True
    frequency_ema: float = 0.99
    detach_inner: bool = True
    tilt: float = 0.002
    use_matryoshka: bool = True
    leave_one_out: bool = False
    loo_scale: float = 1.0
    loo_in_training: bool = False  # also prune each training step's codes (the decoder learns from pruned codes)
    # The recipe's own LR schedule (linear decay to 0 over this final fraction); None = the trainer's.
    lr_decay_fraction: float | None = None
    ksvd_every: int = 0  # K-SVD-style decoder update every this many steps (0 = never)
    ksvd_rate: float = 1.0  # how far each direction moves towards its K-SVD update (1 = all the way)

    def validate(self) -> None:
        super().validate()
        if self.lr_decay_fraction is not None:
            require(
                _finite(self.lr_decay_fraction) and 0 <= self.lr_decay_fraction <= 1,
                "lr_decay_fraction",
                self.lr_decay_fraction,
                "must be in [0, 1] or None (use the trainer's)",
            )
        require(
            isinstance(self.ista_steps, int) and not isinstance(self.ista_steps, bool) and self.ista_steps >= 0,
            "ista_steps",
            self.ista_steps,
            "must be an integer ≥ 0 (0 = plain encoder)",
        )
        require(_finite(self.ista_eta) and self.ista_eta > 0, "ista_eta", self.ista_eta, "must be a finite number > 0")
        if self.k_initial is not None:
            require(
                _finite(self.k_initial) and self.k_initial >= self.k,
                "k_initial",
                self.k_initial,
                f"must be ≥ the final k={self.k} (k decreases during training) or None",
            )
            require(self.k_initial <= self.d_sae, "k_initial", self.k_initial, f"must not exceed d_sae={self.d_sae}")
        require(
            _finite(self.k_anneal_fraction) and 0 < self.k_anneal_fraction <= 1,
            "k_anneal_fraction",
            self.k_anneal_fraction,
            "must be in (0, 1]",
        )
        require(
            self.k_anneal_shape in ("linear", "cosine"),
            "k_anneal_shape",
            self.k_anneal_shape,
            "must be 'linear' or 'cosine'",
        )
        require(
            _finite(self.frequency_ema) and 0 <= self.frequency_ema < 1,
            "frequency_ema",
            self.frequency_ema,
            "must be in [0, 1)",
        )
        require(
            _finite(self.tilt) and self.tilt >= 0, "tilt", self.tilt, "must be a finite number ≥ 0 (0 disables TERM)"
        )
        require(
            _finite(self.loo_scale) and self.loo_scale >= 0, "loo_scale", self.loo_scale, "must be a finite number ≥ 0"
        )
        require(
            self.ista_residual in ("codes", "least_squares"),
            "ista_residual",
            self.ista_residual,
            "must be 'codes' (ISTA) or 'least_squares' (OMP-style)",
        )
        require(_finite(self.ls_ridge) and self.ls_ridge > 0, "ls_ridge", self.ls_ridge, "must be a finite number > 0")
        require(
            isinstance(self.ksvd_every, int) and not isinstance(self.ksvd_every, bool) and self.ksvd_every >= 0,
            "ksvd_every",
            self.ksvd_every,
            "must be an integer ≥ 0 (0 = no K-SVD updates)",
        )
        require(_finite(self.ksvd_rate) and 0 < self.ksvd_rate <= 1, "ksvd_rate", self.ksvd_rate, "must be in (0, 1]")
        if self.d_out is not None:
            # These refine or prune codes against the residual of the INPUT, which a transcoder's
            # decoder does not write (and leave-one-out would need the target at inference).
            why = "for a transcoder (d_out set): it works on the input's residual, and the decoder writes the target"
            require(self.ista_steps == 0, "ista_steps", self.ista_steps, f"must be 0 {why}")
            require(not self.leave_one_out, "leave_one_out", self.leave_one_out, f"must be false {why}")
            require(not self.loo_in_training, "loo_in_training", self.loo_in_training, f"must be false {why}")
            require(self.ksvd_every == 0, "ksvd_every", self.ksvd_every, f"must be 0 {why}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class IstaTrace:
    """One run of the (refined) encoder. `steps[t]` are the codes selected at step t (rescaled units).

    The final state (h_BL = h^T before ⊙ n, Q_BL = R_T W_enc, R_BD = R_T) lets more entries of h^T be
    gathered with gradients (AuxK)."""

    x_s_BD: torch.Tensor
    x_tilde_BD: torch.Tensor  # with grad (b_dec)
    U_LD: torch.Tensor  # decoder used for decoding (unit rows when rescaling), with grad
    norms_L: torch.Tensor | None  # ‖W_dec‖ with grad (None when not rescaling)
    h0_BL: torch.Tensor  # x̃ W_enc + b_enc, no grad
    steps: list[SparseActs]
    scores_BL: torch.Tensor  # final-step selection scores h^T (⊙ n), no grad
    R_BD: torch.Tensor | None
    Q_BL: torch.Tensor | None
    all_scores: list[torch.Tensor] | None = None


@register_sae("recipe")
class RecipeSAE(MatryoshkaSAE):
    """Matryoshka BatchTopK + ISTA refinement + decreasing k + frequency sort + detach + TERM (+ LOO)."""

    config_class = RecipeSAEConfig
    cfg: RecipeSAEConfig
    # `saelab bench --ablate recipe`: each component removed in turn (seed-posts §2.3).
    ablations = {
        "ista": {"ista_steps": 0},
        "decreasing_k": {"k_initial": None},
        "frequency_sort": {"frequency_sort": False},
        "detach_inner": {"detach_inner": False},
        "tilt": {"tilt": 0.0},
        "lr_decay": {"lr_decay_fraction": 0.0},
        "leave_one_out": {"leave_one_out": False},
    }
    saelens_names = {**SAE.saelens_names, "thresholds": "ista_thresholds", "eta": "ista_eta_T"}
    # Registered buffers (nn.Module types buffer attributes as `Tensor | Module`); ista_eta_T is a
    # buffer or, with learn_eta, a Parameter.
    ista_eta_T: torch.Tensor
    ista_thresholds: torch.Tensor
    ista_threshold_weights: torch.Tensor
    latent_freq_L: torch.Tensor
    latent_freq_initialized: torch.Tensor

    def __init__(self, cfg: RecipeSAEConfig):
        super().__init__(cfg)
        device, dtype = self.W_dec_LD.device, self.W_dec_LD.dtype
        eta_T = torch.full((cfg.ista_steps,), float(cfg.ista_eta), dtype=dtype, device=device)
        if cfg.learn_eta and cfg.ista_steps > 0:  # learned freely (no clamp), one η per refinement step
            self.ista_eta_T = nn.Parameter(eta_T)
        else:
            self.register_buffer("ista_eta_T", eta_T)
        # θ_t for t = 0..T in rescaled activation units; θ_T mirrors `topk_threshold`.
        self.register_buffer("ista_thresholds", torch.zeros(cfg.ista_steps + 1, dtype=torch.float64, device=device))
        self.register_buffer(
            "ista_threshold_weights", torch.zeros(cfg.ista_steps + 1, dtype=torch.float64, device=device)
        )
        self.register_buffer("latent_freq_L", torch.zeros(cfg.d_sae, dtype=torch.float64, device=device))
        self.register_buffer("latent_freq_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._ksvd_batch: tuple[torch.Tensor, SparseActs] | None = None  # set by train_forward, used by after_step

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any) -> RecipeSAEConfig:
        """The full recipe at target L0 `l0` (seed-posts §2.3 + §2.4's leave-one-out).

        k = l0 annealed from 2.4·l0 (sprint-3 optimum ratio) linearly over the whole run, ISTA T=1
        η=0.3, frequency-sorted detached Matryoshka at `default_matryoshka_widths(d_sae)`, TERM 0.002,
        plain (full-width) AuxK as in the reference (§2.3 item 8), leave-one-out on. Note: leave-one-out
        prunes at inference, so the evaluated L0 comes out *below* l0 (the post reports ~1/3 pruned).
        The recipe's LR decay over the final third is a trainer setting (`lr_decay_fraction=1/3`).
        As a transcoder (`d_out` given) ISTA and leave-one-out are off: both need the input's residual.
        """
        transcoder = {"ista_steps": 0, "leave_one_out": False} if overrides.get("d_out") is not None else {}
        return RecipeSAEConfig(
            **{
                "d_in": d_in,
                "d_sae": d_sae,
                "k": l0,
                "k_initial": min(2.4 * l0, float(d_sae)),
                "k_anneal_fraction": 1.0,
                "k_anneal_shape": "linear",
                "matryoshka_widths": default_matryoshka_widths(d_sae),
                "use_matryoshka": True,
                "use_matryoshka_aux_loss": False,
                "ista_steps": 1,
                "ista_eta": 0.3,
                "learn_eta": False,
                "frequency_sort": True,
                "frequency_ema": 0.99,
                "detach_inner": True,
                "tilt": 0.002,
                "leave_one_out": True,
                "loo_scale": 1.0,
                "lr_decay_fraction": 1 / 3,
                **transcoder,
                **overrides,
            }
        )

    def train_overrides(self) -> dict[str, Any]:
        return {} if self.cfg.lr_decay_fraction is None else {"lr_decay_fraction": self.cfg.lr_decay_fraction}

    # ----- schedule and ordering ------------------------------------------------------------------
    def current_k(self, ctx: StepContext | None) -> float:
        """k_initial → k over `k_anneal_fraction` of `ctx.total_steps` (linear or cosine); k without ctx."""
        k, k0 = float(self.cfg.k), self.cfg.k_initial
        if k0 is None or ctx is None:
            return k
        duration = max(1, round(self.cfg.k_anneal_fraction * ctx.total_steps))
        progress = min(1.0, max(0.0, ctx.step / duration))
        if self.cfg.k_anneal_shape == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            remaining = 1.0 - progress
        return k + (float(k0) - k) * remaining

    def level_widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths) if self.cfg.use_matryoshka else [self.d_sae]

    def level_order(self) -> torch.Tensor | None:
        """Each latent's rank in descending-frequency order (ties by index); None without sorting."""
        if not self.cfg.frequency_sort:
            return None
        order_L = torch.argsort(self.latent_freq_L, descending=True, stable=True)
        rank_L = torch.empty_like(order_L)
        rank_L[order_L] = torch.arange(self.d_sae, device=order_L.device)
        return rank_L

    @torch.no_grad()
    def update_frequencies(self, acts: SparseActs) -> None:
        """freq ← ema·freq + (1−ema)·(fraction of samples where each latent fired); the first batch sets it."""
        batch_freq_L = torch.bincount(acts.latent_idx, minlength=self.d_sae).to(torch.float64) / max(acts.batch_size, 1)
        ema = self.cfg.frequency_ema
        updated_L = self.latent_freq_L * ema + batch_freq_L * (1 - ema)
        self.latent_freq_L.copy_(torch.where(self.latent_freq_initialized, updated_L, batch_freq_L))
        self.latent_freq_initialized.fill_(True)

    @torch.no_grad()
    def observe_steps(self, steps: list[SparseActs]) -> None:
        """θ_t ← bias-corrected EMA of step t's minimum positive selected activation (no host sync)."""
        low_T = torch.stack([min_positive(a.values) for a in steps])
        debiased_ema_update(
            self.ista_thresholds,
            self.ista_threshold_weights,
            low_T,
            self.cfg.topk_threshold_lr,
            valid=torch.isfinite(low_T),
        )
        self.topk_threshold.copy_(self.ista_thresholds[-1])
        self.topk_threshold_weight.copy_(self.ista_threshold_weights[-1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        default_missing_buffers(state_dict, prefix, {"ista_threshold_weights": "ista_thresholds"})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- the (refined) encoder ----------------------------------------------------------------
    def ista(
        self,
        x_BD: torch.Tensor,
        select: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
        *,
        grad: bool,
        keep_scores: bool = False,
    ) -> IstaTrace:
        """Run h⁰ and the `ista_steps` refinements; `select(scores_BL, t)` picks step t's entries.

        With grad=False everything is plain tensors (inference); with grad=True the selected values,
        residuals and x̂ carry gradients to every parameter through the sparse gathers."""
        cfg = self.cfg
        rescale = cfg.rescale_acts_by_decoder_norm
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            x_s_BD = self.scale_input(x_BD)
            x_tilde_BD = x_s_BD - self.b_dec_D if cfg.apply_b_dec_to_input else x_s_BD
            norms_L = self.W_dec_LD.norm(dim=1) if rescale else None
            U_LD = self.W_dec_LD / norms_L.unsqueeze(1) if norms_L is not None else self.W_dec_LD
        with torch.no_grad():
            x_tilde_ng = x_tilde_BD.detach()
            h0_BL = x_tilde_ng @ self.W_enc_DL + self.b_enc_L
            n_ng = norms_L.detach() if norms_L is not None else None
        B = x_BD.shape[0]
        R_BD = Q_BL = None
        steps: list[SparseActs] = []
        all_scores: list[torch.Tensor] | None = [] if keep_scores else None
        for t in range(cfg.ista_steps + 1):
            with torch.no_grad():
                h_BL = h0_BL if Q_BL is None else h0_BL + Q_BL
                scores_BL = h_BL * n_ng if n_ng is not None else h_BL
            if all_scores is not None:
                all_scores.append(scores_BL)
            batch_idx, latent_idx = select(scores_BL, t)
            if grad:
                values = self._refined_values(x_tilde_ng, h0_BL, R_BD, Q_BL, norms_L, batch_idx, latent_idx)
            else:
                values = scores_BL[batch_idx, latent_idx]
            acts = SparseActs(batch_idx, latent_idx, values, B, self.d_sae)
            steps.append(acts)
            if t == cfg.ista_steps:
                break
            with torch.set_grad_enabled(grad):
                r_BD = x_tilde_BD - self._fit(x_tilde_BD, acts, U_LD).decode_rows(U_LD)
                step_BD = self.ista_eta_T[t].to(r_BD.dtype) * r_BD
                R_BD = step_BD if R_BD is None else R_BD + step_BD
            with torch.no_grad():
                Q_BL = R_BD.detach() @ self.W_enc_DL
        return IstaTrace(x_s_BD, x_tilde_BD, U_LD, norms_L, h0_BL, steps, scores_BL, R_BD, Q_BL, all_scores)

    def _fit(self, x_tilde_BD: torch.Tensor, acts: SparseActs, U_LD: torch.Tensor) -> SparseActs:
        """The codes a refinement step's residual is taken after: the step's own (ISTA) or OMP's
        least-squares coefficients on the same support."""
        if self.cfg.ista_residual == "codes":
            return acts
        with torch.no_grad():  # the fit's coefficients are constants; r = x̃ − cU still carries gradients
            values = least_squares_values(x_tilde_BD.detach(), acts, U_LD.detach(), self.cfg.ls_ridge)
        return SparseActs(acts.batch_idx, acts.latent_idx, values, acts.batch_size, acts.d_sae)

    def _refined_values(self, x_tilde_ng, h0_BL, R_BD, Q_BL, norms_L, batch_idx, latent_idx) -> torch.Tensor:
        """h^t at the chosen entries (⊙ n when rescaling) with gradients; equals the dense scores exactly."""
        h_N = gather_pre_acts(self, x_tilde_ng, h0_BL, batch_idx, latent_idx)
        if R_BD is not None:
            h_N = h_N + gather_matmul(R_BD, self.W_enc_DL, Q_BL, batch_idx, latent_idx)
        if norms_L is not None:
            h_N = h_N * norms_L[latent_idx]
        return h_N

    def _gather_scaled(self, x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx) -> torch.Tensor:
        # AuxK (TopKFamilySAE.aux_k_loss) gathers its dead latents through this method; the recipe
        # passes its IstaTrace as `hidden_pre_BL` so those values are the refined h^T with gradients.
        if isinstance(hidden_pre_BL, IstaTrace):
            tr = hidden_pre_BL
            return self._refined_values(
                tr.x_tilde_BD.detach(), tr.h0_BL, tr.R_BD, tr.Q_BL, tr.norms_L, batch_idx, latent_idx
            )
        return super()._gather_scaled(x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)

    # ----- Matryoshka levels ----------------------------------------------------------------------
    def level_reconstructions(
        self, acts: SparseActs, U_LD: torch.Tensor, rank_L: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(full-width x̂, inner prefix reconstructions for every level but the last).

        Each entry is decoded once, into its level's slice; x̂ sums all slices (never detached); the
        inner ones chain dec₀ = b_dec + slice₀, decₗ = [detach](decₗ₋₁) + sliceₗ."""
        widths = self.level_widths()
        if len(widths) == 1:
            return acts.decode_rows(U_LD) + self.b_dec_D, []
        position_N = acts.latent_idx if rank_L is None else rank_L[acts.latent_idx]
        level_N = torch.bucketize(position_N, torch.tensor(widths, device=position_N.device), right=True)
        slices = [acts.decode_rows(U_LD, mask=level_N == level) for level in range(len(widths))]
        x_hat_BD = self.b_dec_D + torch.stack(slices).sum(0)
        inner, partial = [], None
        for level in range(len(widths) - 1):
            if partial is None:
                partial = self.b_dec_D + slices[0]
            else:
                partial = (partial.detach() if self.cfg.detach_inner else partial) + slices[level]
            inner.append(partial)
        return x_hat_BD, inner

    # ----- training -----------------------------------------------------------------------------
    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        cfg = self.cfg
        self.remember_batch(x_BD)
        trace = self.ista(x_BD, lambda scores_BL, t: self.select(scores_BL, ctx), grad=True)
        acts = trace.steps[-1]
        self.observe_steps(trace.steps)  # thresholds track the BatchTopK selections, as at inference
        if cfg.loo_in_training:
            acts = acts.masked(self.leave_one_out_mask(trace.x_s_BD.detach(), acts, trace.U_LD.detach()))
        self.update_frequencies(acts)
        if cfg.ksvd_every and ctx.step % cfg.ksvd_every == 0:
            self._ksvd_batch = (
                trace.x_s_BD.detach(),
                SparseActs(acts.batch_idx, acts.latent_idx, acts.values.detach(), acts.batch_size, acts.d_sae),
            )
        rank_L = self.level_order()
        x_s_BD = self.loss_target(x_BD, ctx, trace.x_s_BD)  # trace.x_s_BD; a transcoder's s·y − skip
        x_hat_BD, inner = self.level_reconstructions(acts, trace.U_LD, rank_L)
        losses = {"mse": term_mean(mse_per_sample(x_hat_BD, x_s_BD), cfg.tilt)}
        for width, recon_BD, multiplier in zip(self.level_widths(), inner, cfg.inner_multipliers()):
            losses[f"mse_{width}"] = multiplier * term_mean(mse_per_sample(recon_BD, x_s_BD), cfg.tilt)
        aux = self._recipe_aux_loss(trace, x_s_BD, x_hat_BD, inner, rank_L, ctx)
        if aux is not None:
            losses["aux"] = aux
        return StepOutput(
            loss=torch.stack(list(losses.values())).sum(),
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=torch.tensor(acts.batch_idx.numel() / max(x_BD.shape[0], 1)),
            fired_L=acts.fired_L(),
            metrics={"k": float(self.current_k(ctx))},
        )

    def _recipe_aux_loss(self, trace: IstaTrace, x_s_BD, x_hat_BD, inner, rank_L, ctx) -> torch.Tensor | None:
        """AuxK on the refined pre-activations h^T: full width, or per level (use_matryoshka_aux_loss).
        `x_s_BD` is what the reconstructions are trained to match (`loss_target`)."""
        if ctx.dead_mask_L is None or self.cfg.aux_loss_coefficient == 0:
            return None
        zero = x_s_BD.new_tensor(0.0)
        x_tilde_ng = trace.x_tilde_BD.detach()
        widths = self.level_widths()
        if not (self.cfg.use_matryoshka_aux_loss and len(widths) > 1):
            return self.aux_k_loss(
                x_s_BD - x_hat_BD.detach(), x_tilde_ng, trace, trace.scores_BL, trace.U_LD, ctx.dead_mask_L, zero
            )
        total, start = zero, 0
        for width, recon_BD in zip(widths, inner + [x_hat_BD]):
            if rank_L is None:
                in_level_L = torch.zeros(self.d_sae, dtype=torch.bool, device=ctx.dead_mask_L.device)
                in_level_L[start:width] = True
            else:
                in_level_L = (rank_L >= start) & (rank_L < width)
            total = total + self.aux_k_loss(
                x_s_BD - recon_BD.detach(),
                x_tilde_ng,
                trace,
                trace.scores_BL,
                trace.U_LD,
                ctx.dead_mask_L & in_level_L,
                zero,
            )
            start = width
        return total

    def after_step(self) -> None:
        super().after_step()
        pending, self._ksvd_batch = self._ksvd_batch, None
        if pending is not None:
            self.ksvd_update(*pending)

    @torch.no_grad()
    def ksvd_update(self, x_s_BD: torch.Tensor, acts: SparseActs) -> torch.Tensor:
        """Approximate K-SVD (one power iteration per atom, Rubinstein et al. 2008), all atoms at once.

        With unit directions u_j and the batch codes z (rescaled units), atom j's leave-j-out residual
        over its samples is E_j = R + z_j u_jᵀ (R = x̃ − zU, the current decoder's residual); the
        rank-one fit's direction is E_jᵀz_j/‖·‖ = (Rᵀz_j + ‖z_j‖² u_j)/‖·‖. Each fired direction moves
        `ksvd_rate` of the way there (then renormalised); ‖W_dec,j‖ is kept. Returns the fired mask."""
        W_LD = self.W_dec_LD
        x_tilde_BD = x_s_BD - self.b_dec_D if self.cfg.apply_b_dec_to_input else x_s_BD
        norms_L = W_LD.norm(dim=1, keepdim=True).clamp_min(1e-30)
        U_LD = W_LD / norms_L
        values_N = acts.values.to(W_LD.dtype)
        R_BD = x_tilde_BD.to(W_LD.dtype) - acts.decode_rows(U_LD)
        zz_L = torch.zeros(self.d_sae, dtype=W_LD.dtype, device=W_LD.device).index_add_(0, acts.latent_idx, values_N**2)
        target_LD = torch.zeros_like(W_LD).index_add_(0, acts.latent_idx, values_N.unsqueeze(1) * R_BD[acts.batch_idx])
        target_LD += zz_L.unsqueeze(1) * U_LD
        fired_L = zz_L > 0
        target_LD = F.normalize(target_LD, dim=1)
        moved_LD = F.normalize((1 - self.cfg.ksvd_rate) * U_LD + self.cfg.ksvd_rate * target_LD, dim=1)
        W_LD.copy_(torch.where(fired_L.unsqueeze(1), moved_LD * norms_L, W_LD))
        return fired_L

    # ----- inference ----------------------------------------------------------------------------
    def threshold_select(self, scores_BL: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """JumpReLU selection of step t: entries with score > max(θ_t, 0), sample-major."""
        theta = self.ista_thresholds[t].to(scores_BL.dtype)
        mask_BL = (scores_BL > theta) & (scores_BL > 0)
        idx = mask_BL.nonzero()
        return idx[:, 0], idx[:, 1]

    def encode_sparse(self, x_BD: torch.Tensor) -> SparseActs:
        """Inference codes: z⁰ = JumpReLU(h⁰; θ₀), then for each refinement step
        hᵗ⁺¹ = hᵗ + ηₜ(x̃ − zᵗU)W_enc ⊙ n and zᵗ⁺¹ = JumpReLU(hᵗ⁺¹; θₜ₊₁); then leave-one-out if enabled."""
        with torch.no_grad():
            trace = self.ista(x_BD, self.threshold_select, grad=False)
            acts = trace.steps[-1]
            if self.cfg.leave_one_out:
                acts = self.leave_one_out(trace.x_s_BD, acts, trace.U_LD)
        return acts

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.encode_sparse(x_BD).to_dense()

    @torch.no_grad()
    def leave_one_out(self, x_s_BD: torch.Tensor, acts: SparseActs, U_LD: torch.Tensor) -> SparseActs:
        """Bussmann's pruning: x̂ = aU + b_dec, r = x − x̂; keep active j iff
        a_j + r·d_j/‖d_j‖² > loo_scale·θ_T, i.e. the leave-j-out residual's coefficient on d_j
        (= Bussmann's r·d_j + a_j‖d_j‖² for unit-norm d_j, the case with rescaled or folded decoders).
        One simultaneous pass: every score uses the same residual. (r Uᵀ is one dense B×D×L matmul,
        about twice as fast as gathering N rows of U on CPU.)"""
        return acts.masked(self.leave_one_out_mask(x_s_BD, acts, U_LD))

    @torch.no_grad()
    def leave_one_out_mask(self, x_s_BD: torch.Tensor, acts: SparseActs, U_LD: torch.Tensor) -> torch.Tensor:
        """Which entries of `acts` leave-one-out keeps (see `leave_one_out`), as a bool mask."""
        r_BD = x_s_BD - (acts.decode_rows(U_LD) + self.b_dec_D)
        proj_N = (r_BD @ U_LD.t())[acts.batch_idx, acts.latent_idx]
        sq_norm_N = U_LD.pow(2).sum(-1).clamp_min(1e-30)[acts.latent_idx]
        coef_N = acts.values + (proj_N / sq_norm_N).to(acts.values.dtype)
        return coef_N > self.cfg.loo_scale * self.ista_thresholds[-1].to(acts.values.dtype)

    # ----- conversion and folding -----------------------------------------------------------------
    def to_inference(self) -> SAE:
        """The inference SAE.

        ista_steps == 0 and no leave-one-out: a JumpReLU SAE with θ₀ (SAELens loads it).
        Otherwise: a clone of this recipe with the input scale and decoder norms folded in and
        `rescale_acts_by_decoder_norm` off — same codes and outputs, saved with architecture "recipe"
        (and its thresholds and η as extra tensors). SAELens cannot load that architecture; saelab's
        `load_sae` can (once `saelab.saes.recipe` is imported)."""
        source = self.calibrated_clone()
        if self.cfg.ista_steps == 0 and not self.cfg.leave_one_out:
            with torch.no_grad():  # θ₀ is authoritative (topk_threshold only mirrors it while training)
                source.topk_threshold.copy_(source.ista_thresholds[-1])
            return BatchThresholdMixin.to_inference(source)
        return TopKFamilySAE.to_inference(source)

    @torch.no_grad()
    def threshold_cuts(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each refinement step's BatchTopK cut at the final k (what `observe_steps` averages in training)."""
        trace = self.ista(x_BD, lambda scores_BL, t: self.select(scores_BL, None), grad=False)
        return {"ista_thresholds": torch.stack([min_positive(a.values) for a in trace.steps])}

    def _fold_input_scale_extra(self, scale: float) -> None:
        super()._fold_input_scale_extra(scale)
        if self.cfg.rescale_acts_by_decoder_norm:  # θ_t are in units of h·‖W_dec‖ (see BatchThresholdMixin)
            self.ista_thresholds.div_(scale)

    def saelens_config(self) -> dict[str, Any]:
        """Every recipe-specific config field, so `load_sae` rebuilds the same SAE."""
        base = {f.name for f in dataclasses.fields(SAEConfig)}
        return {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg) if f.name not in base}


register_ablations(RecipeSAE)
