"""Matching Pursuit SAE (SAELens `matching_pursuit`; Costa et al., arXiv 2506.03093).

A tied SAE (W_enc ≡ W_decᵀ) whose encoder is greedy matching pursuit over the decoder rows d_j:

    r ← x̃ = s·x − b_dec;  f ← 0
    repeat ≤ max_iterations (default d_in):
        j = argmax_j ReLU(r · d_j)        (no gradient: an index)
        α = ReLU(r · d_j)                  (gradient flows)
        f_j += α;  r ← r − α d_j
        a sample stops once ‖r‖ < residual_threshold (if > 0) or, with stop_on_duplicate_support,
        once an iteration leaves its support unchanged (that iteration's α still counts)
    x̂ = f W_dec (+ b_dec if apply_b_dec_to_input)

Loss = MSE only. Memory: the [B, L] correlations of each iteration are computed without autograd;
only the selected rows d_j [B, D], α [B] and r [B, D] enter the graph, so backward memory is
O(iterations · B · D) instead of O(iterations · B · L).

Speed: the correlations are not recomputed from the residual each iteration (a B×D×L matmul).
Since r·W_decᵀ after taking α·d_j is the old correlations minus α·G[j] with G = W_dec W_decᵀ,
one matmul for x̃ W_decᵀ, one for G and a [B, L] row update per iteration give the same argmax at
about 1/T of the cost for T iterations (refreshed exactly every `GRAM_REFRESH` iterations so float
drift cannot build up over long pursuits). α itself is always the exact r·d_j.

There is a single weight matrix, `W_dec_LD`; `W_enc_DL` is its transpose (a view, not a parameter)
and `b_enc_L` is always zero. SAELens stores MP SAEs as `W_dec` and `b_dec` only (its loader rejects
a `W_enc` key), so those are the only on-disk tensors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from saelab.errors import require
from saelab.saes.base import SAE, SAEConfig, StepContext, StepOutput, mse_per_sample
from saelab.saes.kernels import SparseActs
from saelab.saes.registry import register_sae

_TIED_NAMES = frozenset({"W_enc_DL", "b_enc_L"})


@dataclass(kw_only=True)
class MatchingPursuitSAEConfig(SAEConfig):
    residual_threshold: float = 1e-2  # in the units the SAE sees (scaled units while training)
    max_iterations: int | None = None  # None → d_in
    stop_on_duplicate_support: bool = True
    decoder_init_norm: float | None = 1.0  # forced: MP assumes (roughly) unit-norm atoms

    def __post_init__(self) -> None:
        # None ("no rescaling", e.g. from a loaded cfg.json) is coerced quietly; another norm is a
        # user choice being overridden, so it warns (as SAELens does).
        if self.decoder_init_norm is not None and self.decoder_init_norm != 1.0:
            warnings.warn(
                f"decoder_init_norm={self.decoder_init_norm!r} is not supported for matching_pursuit; using 1.0",
                stacklevel=3,
            )
        self.decoder_init_norm = 1.0
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        require(
            isinstance(self.residual_threshold, (int, float))
            and math.isfinite(self.residual_threshold)
            and self.residual_threshold >= 0,
            "residual_threshold",
            self.residual_threshold,
            "must be a finite number ≥ 0 (0 disables the residual stop)",
        )
        require(
            self.max_iterations is None or (isinstance(self.max_iterations, int) and self.max_iterations > 0),
            "max_iterations",
            self.max_iterations,
            "must be a positive integer or None (= d_in)",
        )

    @property
    def iterations(self) -> int:
        return self.max_iterations if self.max_iterations is not None else self.d_in


class PursuitResult(NamedTuple):
    """Codes as flat triples (one per sample per iteration run; values 0 where a sample had stopped)."""

    batch_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor  # carries autograd
    residual_BD: torch.Tensor  # carries autograd
    support_BL: torch.Tensor  # bool, no autograd: latents with a nonzero code
    iterations: int


GRAM_REFRESH = 16  # iterations between exact recomputations of the Gram-updated correlations
GRAM_MAX_ELEMENTS = 1 << 26  # G is [L, L]: up to 256 MiB in float32 (L = 8,192)


def use_gram_updates(batch_size: int, d_sae: int, max_iterations: int) -> bool:
    """Whether Gram-updated correlations beat recomputing them: G costs one L×D×L matmul, which pays
    for itself once the pursuit would otherwise run more than L/B extra B×D×L matmuls."""
    return d_sae * d_sae <= GRAM_MAX_ELEMENTS and (max_iterations - 1) * batch_size > d_sae


def matching_pursuit(
    x_BD: torch.Tensor,
    W_dec_LD: torch.Tensor,
    residual_threshold: float,
    max_iterations: int,
    stop_on_duplicate_support: bool,
    gram: bool | None = None,
) -> PursuitResult:
    """Greedy matching pursuit of centred inputs `x_BD` over the rows of `W_dec_LD` (SAELens semantics).

    `gram`: track correlations by Gram-matrix updates (None: when `use_gram_updates` says it is faster)."""
    B = x_BD.shape[0]
    L = W_dec_LD.shape[0]
    device = x_BD.device
    if gram is None:
        gram = use_gram_updates(B, L, max_iterations)
    W_ng_LD = W_dec_LD.detach()
    gram_LL = corr_BL = None
    if gram:
        with torch.no_grad():
            gram_LL = (W_ng_LD @ W_ng_LD.t()).to(x_BD.dtype)
    arange_B = torch.arange(B, device=device)
    residual_BD = x_BD
    support_BL = torch.zeros(B, L, dtype=torch.bool, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    use_threshold = residual_threshold > 0
    latent_parts: list[torch.Tensor] = []
    value_parts: list[torch.Tensor] = []
    iterations = 0
    for step in range(max_iterations):
        iterations += 1
        with torch.no_grad():
            # argmax of ReLU(r·W_decᵀ) = argmax of r·W_decᵀ whenever the max is positive; when it
            # is not, α below is 0 and the choice is irrelevant. No [B, L] tensor enters the graph.
            if corr_BL is None or step % GRAM_REFRESH == 0:
                corr_BL = residual_BD.detach() @ W_ng_LD.t().to(residual_BD.dtype)
            idx_B = corr_BL.argmax(dim=1)
        atoms_BD = W_dec_LD[idx_B].to(residual_BD.dtype)
        alpha_B = (residual_BD * atoms_BD).sum(dim=-1).relu()
        # Samples that already stopped contribute nothing more (their residual is frozen).
        alpha_B = torch.where(done_B, torch.zeros_like(alpha_B), alpha_B)
        residual_BD = residual_BD - alpha_B.unsqueeze(1) * atoms_BD
        if gram_LL is not None:
            with torch.no_grad():
                # index_select, not gram_LL[idx_B]: the latter is ~8x slower on CPU.
                corr_BL.addcmul_(gram_LL.index_select(0, idx_B), alpha_B.detach().unsqueeze(1), value=-1)
        else:
            corr_BL = None
        latent_parts.append(idx_B)
        value_parts.append(alpha_B)
        with torch.no_grad():
            was_in_support_B = support_BL[arange_B, idx_B]
            added_B = alpha_B.detach() > 0
            # One (sample, latent) pair per row, so this scatter has no collisions (and no sync).
            support_BL[arange_B, idx_B] = was_in_support_B | added_B
            if stop_on_duplicate_support or use_threshold:
                if stop_on_duplicate_support:
                    # Codes only grow (α ≥ 0), so the support is unchanged iff nothing new was added.
                    done_B = done_B | was_in_support_B | ~added_B
                if use_threshold:
                    done_B = done_B | (residual_BD.detach().norm(dim=-1) < residual_threshold)
                if bool(done_B.all()):
                    break
    return PursuitResult(
        batch_idx=arange_B.repeat(iterations),
        latent_idx=torch.cat(latent_parts),
        values=torch.cat(value_parts),
        residual_BD=residual_BD,
        support_BL=support_BL,
        iterations=iterations,
    )


@register_sae("matching_pursuit")
class MatchingPursuitSAE(SAE):
    config_class = MatchingPursuitSAEConfig
    cfg: MatchingPursuitSAEConfig
    saelens_names = {"W_dec": "W_dec_LD", "b_dec": "b_dec_D"}

    # The base constructor creates W_enc_DL and b_enc_L; a tied SAE keeps neither (see properties).
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _TIED_NAMES:
            return
        super().__setattr__(name, value)

    @property
    def W_enc_DL(self) -> torch.Tensor:  # type: ignore[override]
        return self.W_dec_LD.t()

    @property
    def b_enc_L(self) -> torch.Tensor:  # type: ignore[override]
        return torch.zeros(self.cfg.d_sae, dtype=self.W_dec_LD.dtype, device=self.W_dec_LD.device)

    @classmethod
    def config_for_l0(
        cls, d_in: int, d_sae: int, l0: float, total_steps: int, **overrides: Any
    ) -> MatchingPursuitSAEConfig:
        """SynthSAEBench: exactly round(l0) pursuit steps ("serial TopK"), no other stop."""
        return MatchingPursuitSAEConfig(
            **{
                "d_in": d_in,
                "d_sae": d_sae,
                "residual_threshold": 0.0,
                "max_iterations": max(1, int(round(l0))),
                "stop_on_duplicate_support": False,
                **overrides,
            }
        )

    # ----- encoding ---------------------------------------------------------------------------
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The first iteration's correlations x̃ W_decᵀ (there is no single pre-activation in MP)."""
        return self.process_input(x_BD) @ self.W_dec_LD.t()

    def pursue(self, x_BD: torch.Tensor) -> PursuitResult:
        """Run matching pursuit on raw inputs [B, D] (scaled and centred here)."""
        return self._pursue_processed(self.process_input(x_BD))

    def _pursue_processed(self, x_tilde_BD: torch.Tensor) -> PursuitResult:
        cfg = self.cfg
        return matching_pursuit(
            x_tilde_BD,
            self.W_dec_LD,
            residual_threshold=cfg.residual_threshold,
            max_iterations=cfg.iterations,
            stop_on_duplicate_support=cfg.stop_on_duplicate_support,
        )

    def encode_sparse(self, x_BD: torch.Tensor) -> SparseActs:
        """Codes as (sample, latent, value) triples, repeated selections summed, zeros dropped."""
        res = self.pursue(x_BD)
        return _sparse_from(res, x_BD.shape[0], self.cfg.d_sae)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        lead = x_BD.shape[:-1]
        flat_BD = x_BD.reshape(-1, x_BD.shape[-1])
        res = self.pursue(flat_BD)
        acts_BL = res.values.new_zeros(flat_BD.shape[0], self.cfg.d_sae)
        acts_BL = acts_BL.index_put((res.batch_idx, res.latent_idx), res.values, accumulate=True)
        return acts_BL.reshape(*lead, self.cfg.d_sae)

    def reconstruct(self, acts_BL: torch.Tensor) -> torch.Tensor:
        # Tied: b_dec is part of the model only if it was taken off the input.
        x_hat_BD = acts_BL.to(self.W_dec_LD.dtype) @ self.W_dec_LD
        return x_hat_BD + self.b_dec_D if self.cfg.apply_b_dec_to_input else x_hat_BD

    def reconstruct_sparse(self, acts: SparseActs, W_dec_LD: torch.Tensor | None = None) -> torch.Tensor:
        x_hat_BD = super().reconstruct_sparse(acts, W_dec_LD)
        return x_hat_BD if self.cfg.apply_b_dec_to_input else x_hat_BD - self.b_dec_D

    # ----- training ---------------------------------------------------------------------------
    def train_forward(self, x_BD: torch.Tensor, ctx: StepContext) -> StepOutput:
        target_BD = self.scale_input(x_BD)
        x_tilde_BD = self.process_input(x_BD)
        res = self._pursue_processed(x_tilde_BD)
        # f W_dec = x̃ − r exactly (r is x̃ minus every α·d_j taken), so no [B, L] codes are needed.
        x_hat_BD = x_tilde_BD - res.residual_BD
        if self.cfg.apply_b_dec_to_input:
            x_hat_BD = x_hat_BD + self.b_dec_D
        mse = mse_per_sample(x_hat_BD, target_BD).mean()
        with torch.no_grad():
            l0_B = res.support_BL.sum(dim=-1).float()
            residual_norm_B = res.residual_BD.norm(dim=-1)
            metrics = {
                "residual_norm": float(residual_norm_B.mean()),
                "converged_portion": float((residual_norm_B < self.cfg.residual_threshold).float().mean()),
                "max_l0": float(l0_B.max()),
                "min_l0": float(l0_B.min()),
                "iterations": float(res.iterations),
            }
        return StepOutput(
            loss=mse,
            losses={"mse": mse},
            x_hat_BD=x_hat_BD,
            l0=l0_B.mean(),
            fired_L=res.support_BL.any(dim=0),
            metrics=metrics,
        )

    # ----- construction and weight surgery -------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            L, D = self.W_dec_LD.shape
            bound = math.sqrt(6.0 / D)  # the base init; unit rows since decoder_init_norm is forced to 1
            self.W_dec_LD.uniform_(-bound, bound, generator=generator)
            self.W_dec_LD.div_(self.W_dec_LD.norm(dim=1, keepdim=True))
            self.b_dec_D.zero_()

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold s so raw inputs give the same outputs. With one tied matrix the encoder cannot absorb s:
        W_dec stays, b_dec ← b_dec/s and residual_threshold ← threshold/s; the pursuit then runs on
        x̃/s, selecting the same atoms with codes f/s, so x̂ comes out in input units (as SAELens)."""
        if self.cfg.normalize_activations == "none":
            return
        s = float(self.input_scale)
        self.b_dec_D.div_(s)
        self.input_scale.fill_(1.0)
        self.cfg = dataclasses.replace(
            self.cfg, normalize_activations="none", residual_threshold=self.cfg.residual_threshold / s
        )

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "fold_W_dec_norm is not supported for matching_pursuit: rescaling the tied atoms changes which ones the pursuit selects"
        )

    def saelens_config(self) -> dict[str, Any]:
        return {
            "residual_threshold": self.cfg.residual_threshold,
            "max_iterations": self.cfg.max_iterations,
            "stop_on_duplicate_support": self.cfg.stop_on_duplicate_support,
        }


def _sparse_from(res: PursuitResult, batch_size: int, d_sae: int) -> SparseActs:
    """Sum repeated selections of a latent per sample and drop zero codes."""
    keep = res.values != 0
    batch_idx, latent_idx, values = res.batch_idx[keep], res.latent_idx[keep], res.values[keep]
    key = batch_idx * d_sae + latent_idx
    unique_key, inverse = torch.unique(key, return_inverse=True)
    summed = values.new_zeros(unique_key.shape[0]).index_add(0, inverse, values)
    return SparseActs(
        batch_idx=unique_key // d_sae,
        latent_idx=unique_key % d_sae,
        values=summed,
        batch_size=batch_size,
        d_sae=d_sae,
    )
