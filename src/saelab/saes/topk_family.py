"""Shared machinery of the TopK family (TopK, BatchTopK, Matryoshka BatchTopK).

Why it is fast: the dense encoder matmul x̃ W_enc is computed once without autograd; only the
selected (sample, latent) entries enter the graph, through `gather_pre_acts` (in `kernels`), whose backward
touches just those entries (N·D work for N active entries instead of B·L·D). The decoder likewise
reads only the active rows of W_dec. So a training step costs one dense B×D×L matmul plus
O(N·D) sparse work, where SAELens pays for about six dense matmuls.

Activations are "rescaled by decoder norm" (SAELens default): selection uses h ⊙ ‖W_dec‖ and
decoding uses W_dec / ‖W_dec‖, so the decoder norm never changes which latents fire.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar, cast

import torch

from saelab.errors import require
from saelab.saes.base import SAE, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SparseActs, gather_pre_acts

if TYPE_CHECKING:
    from saelab.saes.batchtopk import BatchTopKSAEConfig
    from saelab.saes.jumprelu import JumpReLUSAE

_TopKT = TypeVar("_TopKT", bound="TopKFamilySAE")


def select_topk(scores_BL: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-k entries with positive score, as (batch_idx, latent_idx)."""
    k = min(int(k), scores_BL.shape[1])
    values_BK, latent_BK = scores_BL.topk(k, dim=1, sorted=False)
    keep_BK = values_BK > 0
    batch_BK = torch.arange(scores_BL.shape[0], device=scores_BL.device).unsqueeze(1).expand_as(latent_BK)
    return batch_BK[keep_BK], latent_BK[keep_BK]


def select_batch_topk(scores_BL: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The int(k·B) largest positive entries of the whole batch, as (batch_idx, latent_idx).

    Exact, but avoids a full top-k over B·L values (slower than the encoder matmul itself):
    a strided sample estimates a threshold a little below the cut, the entries above it are the
    candidates, and top-k runs on those. Falls back to the full top-k if the sample undershot.
    """
    B, L = scores_BL.shape
    flat = scores_BL.reshape(-1)
    m = min(int(k * B), flat.numel())
    if m <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=scores_BL.device)
        return empty, empty
    candidates = None
    n_sample = 65536
    if flat.numel() > 4 * n_sample and m < flat.numel() // 8:
        stride = flat.numel() // n_sample
        sample = flat[::stride]
        # Aim the cut at 1.5x the wanted count (plus slack for sampling noise).
        frac = min(1.0, (1.5 * m + 64 * stride) / flat.numel())
        pos = max(1, int(sample.numel() * (1.0 - frac)))
        threshold = sample.kthvalue(pos).values
        mask = flat > threshold
        idx = mask.nonzero().squeeze(1)
        if idx.numel() >= m:
            candidates = idx
    if candidates is None:
        top = flat.topk(m, sorted=False)
        flat_idx = top.indices[top.values > 0]
    else:
        top = flat[candidates].topk(m, sorted=False)
        flat_idx = candidates[top.indices[top.values > 0]]
    flat_idx = flat_idx.sort().values  # sample-major order, as SparseActs expects
    return flat_idx // L, flat_idx % L


@dataclass(kw_only=True)
class TopKFamilyConfig(SAEConfig):
    k: float = 100
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.k > 0, "k", self.k, "must be positive")
        require(self.k <= self.d_sae, "k", self.k, f"must not exceed the width d_sae={self.d_sae}")
        require(self.aux_loss_coefficient >= 0, "aux_loss_coefficient", self.aux_loss_coefficient, "must be ≥ 0")


class TopKFamilySAE(SAE):
    """Base of the TopK family. Subclasses choose which entries fire (`select`)."""

    cfg: TopKFamilyConfig
    supports_transcoder = True

    def select(self, scores_BL: torch.Tensor, ctx: StepContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def config_for_l0(cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides):
        return cls.config_class(**{"d_in": d_in, "d_sae": d_sae, "k": l0, **overrides})

    def current_k(self, ctx: StepContext | None) -> float:
        return self.cfg.k

    # ----- encoding ---------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec_LD.norm(dim=1)
        return torch.ones(self.d_sae, dtype=self.W_dec_LD.dtype, device=self.W_dec_LD.device)

    def unit_decoder(self) -> torch.Tensor:
        """W_dec with rows divided by their norms (with grad), or W_dec when not rescaling."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec_LD / self.W_dec_LD.norm(dim=1, keepdim=True)
        return self.W_dec_LD

    def encode_train(
        self, x_BD: torch.Tensor, ctx: StepContext | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], SparseActs]:
        """(x̃, (hidden_pre_BL, scores_BL) without grad, active codes with grad) for a training step."""
        with torch.no_grad():
            x_tilde_BD = self.process_input(x_BD)
            hidden_pre_BL = x_tilde_BD @ self.W_enc_DL + self.b_enc_L
            scores_BL = hidden_pre_BL * self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else hidden_pre_BL
        batch_idx, latent_idx = self.select(scores_BL, ctx)
        values = self._gather_scaled(x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)
        acts = SparseActs(batch_idx, latent_idx, values, x_BD.shape[0], self.d_sae)
        return x_tilde_BD, (hidden_pre_BL, scores_BL), acts

    def _gather_scaled(self, x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx) -> torch.Tensor:
        h_N = gather_pre_acts(self, x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)
        if self.cfg.rescale_acts_by_decoder_norm:
            h_N = h_N * self.W_dec_LD.norm(dim=1)[latent_idx]
        return h_N

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x_tilde_BD = self.process_input(x_BD)
            scores_BL = (x_tilde_BD @ self.W_enc_DL + self.b_enc_L) * self.decoder_norms()
            batch_idx, latent_idx = self.select(scores_BL, None)
            acts_BL = torch.zeros_like(scores_BL)
            acts_BL[batch_idx, latent_idx] = scores_BL[batch_idx, latent_idx]
        return acts_BL

    def reconstruct(self, acts_BL: torch.Tensor) -> torch.Tensor:
        return acts_BL.to(self.W_dec_LD.dtype) @ self.unit_decoder() + self.b_dec_D

    # ----- training ---------------------------------------------------------------------------
    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        x_s_BD = self.loss_target(x_BD, ctx)  # s·x; a transcoder's s·y − skip
        x_tilde_BD, (hidden_pre_BL, scores_BL), acts = self.encode_train(x_BD, ctx)
        W_unit_LD = self.unit_decoder()
        x_hat_BD = self.reconstruct_sparse(acts, W_unit_LD)
        mse = mse_per_sample(x_hat_BD, x_s_BD).mean()
        losses = {"mse": mse}
        losses.update(self.extra_losses(x_s_BD, x_tilde_BD, hidden_pre_BL, scores_BL, acts, W_unit_LD, ctx))
        aux = self.aux_loss(x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, ctx)
        if aux is not None:
            losses["aux"] = aux
        loss = torch.stack(list(losses.values())).sum()
        self.observe_acts(acts)
        metrics = {"k": float(self.current_k(ctx))}
        return StepOutput(
            loss=loss,
            losses=losses,
            x_hat_BD=x_hat_BD,
            l0=torch.tensor(acts.batch_idx.numel() / max(x_BD.shape[0], 1)),
            fired_L=acts.fired_L(),
            metrics=metrics,
        )

    def extra_losses(
        self, x_s_BD, x_tilde_BD, hidden_pre_BL, scores_BL, acts, W_unit_LD, ctx
    ) -> dict[str, torch.Tensor]:
        """Losses beyond the full-width MSE (Matryoshka's inner levels)."""
        return {}

    def observe_acts(self, acts: SparseActs) -> None:
        """Post-forward bookkeeping (BatchTopK's threshold EMA)."""

    def aux_loss(self, x_s_BD, x_hat_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, ctx) -> torch.Tensor | None:
        """AuxK (Gao et al.): the top dead latents reconstruct the detached residual."""
        if ctx.dead_mask_L is None or self.cfg.aux_loss_coefficient == 0:
            return None
        return self.aux_k_loss(
            x_s_BD - x_hat_BD.detach(),
            x_tilde_BD,
            hidden_pre_BL,
            scores_BL,
            W_unit_LD,
            ctx.dead_mask_L,
            x_s_BD.new_tensor(0.0),
        )

    def aux_k_loss(self, residual_BD, x_tilde_BD, hidden_pre_BL, scores_BL, W_unit_LD, dead_mask_L, zero):
        """scale · ‖Σ_top-k_aux dead latents − residual‖², k_aux = d_in // 2, scale = min(n_dead/k_aux, 1).

        Dead latents are picked by their pre-activation (no ReLU), as SAELens does.
        """
        dead_idx = dead_mask_L.nonzero().squeeze(1)
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return zero
        k_aux = self.d_out // 2  # half the width of the space the residual lives in (d_in for an autoencoder)
        scale = min(n_dead / k_aux, 1.0)
        k_sel = min(k_aux, n_dead)
        with torch.no_grad():
            _, pos_BK = scores_BL[:, dead_idx].topk(k_sel, dim=1, sorted=False)
        latent_idx = dead_idx[pos_BK].reshape(-1)
        batch_idx = torch.arange(scores_BL.shape[0], device=scores_BL.device).repeat_interleave(k_sel)
        values = self._gather_scaled(x_tilde_BD, hidden_pre_BL, batch_idx, latent_idx)
        aux_acts = SparseActs(batch_idx, latent_idx, values, residual_BD.shape[0], self.d_sae)
        recon_BD = aux_acts.decode_rows(W_unit_LD)
        return self.cfg.aux_loss_coefficient * scale * mse_per_sample(recon_BD, residual_BD.detach()).mean()

    # ----- inference conversion ------------------------------------------------------------------
    def to_inference(self) -> SAE:
        return self.folded_clone()

    def folded_clone(self: _TopKT) -> _TopKT:
        """A clone with the input scale and decoder norms folded in (what `to_inference` returns)."""
        sae = self.clone()
        sae.fold_input_scale()
        if sae.cfg.rescale_acts_by_decoder_norm:
            sae.fold_W_dec_norm()
            sae.cfg = dataclasses.replace(sae.cfg, rescale_acts_by_decoder_norm=False)
        return sae


def min_positive(values: torch.Tensor) -> torch.Tensor:
    """The smallest positive entry as a float64 scalar (inf if none); no host sync."""
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=values.device)
    if values.numel() == 0:
        return inf
    return torch.where(values > 0, values.detach().to(torch.float64), inf).min()


@torch.no_grad()
def debiased_ema_update(
    value: torch.Tensor, weight: torch.Tensor, observed: torch.Tensor, lr: float, valid: torch.Tensor | None = None
) -> None:
    """In place: `value` ← the bias-corrected EMA of the observations, `weight` ← 1 − (1−lr)ⁿ.

    A plain EMA started at 0 is (1 − (1−lr)ⁿ)·(average) after n updates: 63% of it after 100 steps
    at lr 0.01, so a threshold kept that way fires far too many latents after a short run. As in
    Adam, the raw EMA m = value·weight is divided by its weight. Where `valid` is False (no
    observation this step) both stay unchanged; no host sync."""
    new_weight = (1 - lr) * weight + lr
    new_value = ((1 - lr) * value * weight + lr * observed.to(value.dtype)) / new_weight
    if valid is not None:
        new_weight = torch.where(valid, new_weight, weight)
        new_value = torch.where(valid, new_value, value)
    value.copy_(new_value)
    weight.copy_(new_weight)


def default_missing_buffers(state_dict: dict, prefix: str, defaults: dict[str, str]) -> None:
    """Checkpoints from before a weight buffer existed: weight 1 = their threshold taken as is."""
    for weight_name, value_name in defaults.items():
        if prefix + weight_name not in state_dict and prefix + value_name in state_dict:
            state_dict[prefix + weight_name] = torch.ones_like(state_dict[prefix + value_name])


# The mixin is only ever combined with a TopKFamilySAE (`class X(BatchThresholdMixin, TopKFamilySAE)`);
# type checkers see that base so `self` has the SAE's attributes. At runtime the mixin derives from object.
if TYPE_CHECKING:
    _BatchThresholdBase = TopKFamilySAE
else:
    _BatchThresholdBase = object

_BatchThresholdT = TypeVar("_BatchThresholdT", bound="BatchThresholdMixin")


class BatchThresholdMixin(_BatchThresholdBase):
    """BatchTopK's global threshold θ, the cut an inference JumpReLU uses on every latent.

    While training, θ is the bias-corrected EMA (rate η) of each batch's minimum positive selected
    activation (float64). The EMA lags: activations grow during training, so after a short run the
    average of past cuts sits well below the final weights' cut (30% low after 100 steps on a toy
    model, firing ~30% more latents than asked). So `to_inference` recalibrates: it recomputes the
    cut with the final weights on the last `calibration_batches` training batches (kept in memory,
    not in the state dict) and uses their mean. The EMA is what remains for an SAE that has seen no
    batch in this process (loaded, or resumed with nothing left to train).
    """

    calibration_batches: ClassVar[int] = 4
    cfg: BatchTopKSAEConfig
    # Registered buffers (nn.Module types buffer attributes as `Tensor | Module`).
    topk_threshold: torch.Tensor
    topk_threshold_weight: torch.Tensor

    def init_threshold(self) -> None:
        device = self.W_dec_LD.device
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("topk_threshold_weight", torch.zeros((), dtype=torch.float64, device=device))
        self._recent_inputs: deque[torch.Tensor] = deque(maxlen=self.calibration_batches)

    def remember_batch(self, x_BD: torch.Tensor) -> None:
        """Keep a training batch for `to_inference`'s threshold calibration."""
        self._recent_inputs.append(x_BD.detach())

    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.remember_batch(x_BD)
        return super().train_forward(x_BD, ctx)

    @torch.no_grad()
    def selected_scores(self, x_BD: torch.Tensor) -> SparseActs:
        """The entries the batch selection keeps for `x_BD`, with their scores, at the current weights."""
        x_tilde_BD = self.process_input(x_BD)
        scores_BL = (x_tilde_BD @ self.W_enc_DL + self.b_enc_L) * self.decoder_norms()
        batch_idx, latent_idx = self.select(scores_BL, None)
        return SparseActs(batch_idx, latent_idx, scores_BL[batch_idx, latent_idx], x_BD.shape[0], self.d_sae)

    @torch.no_grad()
    def threshold_cuts(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Threshold buffer → this batch's BatchTopK cut at the final k, with the current weights."""
        return {"topk_threshold": min_positive(self.selected_scores(x_BD).values)}

    @torch.no_grad()
    def calibrated_clone(self: _BatchThresholdT) -> _BatchThresholdT:
        """A clone whose thresholds are the mean cuts of the final weights on the remembered batches."""
        clone = self.clone()
        cuts: dict[str, list[torch.Tensor]] = {}
        for x_BD in self._recent_inputs:
            for name, cut in self.threshold_cuts(x_BD).items():
                cuts.setdefault(name, []).append(cut)
        for name, values in cuts.items():
            stacked = torch.stack(values)  # [batches] or [batches, steps]
            found = torch.isfinite(stacked)  # inf: a batch with no positive selection
            mean = torch.where(found, stacked, 0).sum(0) / found.sum(0).clamp_min(1)
            buffer = getattr(clone, name)
            buffer.copy_(torch.where(found.any(0), mean, buffer))
        return clone

    @torch.no_grad()
    def observe_acts(self, acts: SparseActs) -> None:
        positive = acts.values[acts.values > 0]
        if positive.numel():
            debiased_ema_update(
                self.topk_threshold, self.topk_threshold_weight, positive.min(), self.cfg.topk_threshold_lr
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        default_missing_buffers(state_dict, prefix, {"topk_threshold_weight": "topk_threshold"})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fold_input_scale_extra(self, scale: float) -> None:
        # θ is in units of h·‖W_dec‖, and folding divided W_dec by the scale (SAELens #763).
        if self.cfg.rescale_acts_by_decoder_norm:
            self.topk_threshold.div_(scale)

    def to_inference(self) -> SAE:
        """A JumpReLU SAE with the decoder norms and input scale folded in and θ on every latent."""
        from saelab.saes.registry import registered_sae_class

        folded = self.calibrated_clone().folded_clone()
        jumprelu_cls = cast("type[JumpReLUSAE]", registered_sae_class("jumprelu"))  # the built-in JumpReLU
        cfg = jumprelu_cls.config_class(
            d_in=self.d_in,
            d_sae=self.d_sae,
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            decoder_init_norm=self.cfg.decoder_init_norm,
            dtype=self.cfg.dtype,
            device=self.cfg.device,
            d_out=self.cfg.d_out,
            skip=self.cfg.skip,
        )
        sae = jumprelu_cls(cfg)
        with torch.no_grad():
            for name in ("W_enc_DL", "b_enc_L", "W_dec_LD", "b_dec_D") + (("W_skip_ED",) if self.cfg.skip else ()):
                getattr(sae, name).copy_(getattr(folded, name))
            sae.threshold_L.fill_(float(folded.topk_threshold))
        return sae
