"""Sparse kernels shared by architectures: the active-latent container and its gathers and solves.

`SparseActs` holds a batch's active (sample, latent, value) entries; the autograd functions here
gather chosen entries of a dense product with a backward that touches only those entries (N·D work
instead of B·L·D); `least_squares_values` is OMP's projection on a support. Nothing here knows an
architecture: SAEs pass their own tensors in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class SparseActs:
    """Active latents of a batch as flat entries: sample `batch_idx`, latent `latent_idx`, `values`.

    Entries are ordered by sample (each sample's entries are contiguous), which lets the decoder
    run as one fused gather-scale-sum (`embedding_bag`) over only the active rows of W_dec.
    """

    batch_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor
    batch_size: int
    d_sae: int

    def offsets(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start of each sample's entries (optionally among the entries selected by `mask`)."""
        batch_idx = self.batch_idx if mask is None else self.batch_idx[mask]
        counts_B = torch.bincount(batch_idx, minlength=self.batch_size)
        return torch.cumsum(counts_B, 0) - counts_B

    def decode_rows(self, W_LD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_entries value · W[latent] per sample, [B, D] (no bias)."""
        latent_idx, values = self.latent_idx, self.values
        if mask is not None:
            latent_idx, values = latent_idx[mask], values[mask]
        if latent_idx.numel() * 8 > self.batch_size * self.d_sae:
            # Dense enough (e.g. AuxK's d_in/2 latents per sample) that a matmul beats the gather.
            batch_idx = self.batch_idx if mask is None else self.batch_idx[mask]
            acts_BL = torch.zeros(self.batch_size, self.d_sae, dtype=W_LD.dtype, device=W_LD.device)
            acts_BL = acts_BL.index_put((batch_idx, latent_idx), values.to(W_LD.dtype))
            return acts_BL @ W_LD
        return F.embedding_bag(
            latent_idx, W_LD, self.offsets(mask), mode="sum", per_sample_weights=values.to(W_LD.dtype)
        )

    def masked(self, keep_N: torch.Tensor) -> SparseActs:
        """The entries where `keep_N` is True (order, and so the sample-major layout, preserved)."""
        return SparseActs(
            self.batch_idx[keep_N], self.latent_idx[keep_N], self.values[keep_N], self.batch_size, self.d_sae
        )

    def to_dense(self) -> torch.Tensor:
        acts_BL = torch.zeros(self.batch_size, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        acts_BL[self.batch_idx, self.latent_idx] = self.values
        return acts_BL

    def l0(self) -> float:
        return float((self.values != 0).sum().item()) / max(self.batch_size, 1)

    def fired_L(self) -> torch.Tensor:
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        fired[self.latent_idx[self.values != 0]] = True
        return fired


class _GatherPreActs(torch.autograd.Function):
    """Values of h = (x_s − b_dec) W_enc + b_enc at chosen entries; backward visits only those.

    The input itself needs no gradient, so b_dec's gradient is −W_enc · Σ_N g (a D×L mat-vec)."""

    @staticmethod
    def forward(ctx, x_tilde_BD, b_dec_D, W_enc_DL, b_enc_L, hidden_pre_BL, batch_idx_N, latent_idx_N):
        ctx.save_for_backward(x_tilde_BD, W_enc_DL, batch_idx_N, latent_idx_N)
        ctx.d_sae = hidden_pre_BL.shape[1]
        ctx.has_b_dec = b_dec_D is not None
        return hidden_pre_BL[batch_idx_N, latent_idx_N]

    @staticmethod
    def backward(ctx, grad_N):
        x_tilde_BD, W_enc_DL, batch_idx_N, latent_idx_N = ctx.saved_tensors
        grad_N = grad_N.to(x_tilde_BD.dtype)
        grad_W = grad_b_dec = None
        grad_b_L = torch.zeros(ctx.d_sae, dtype=grad_N.dtype, device=grad_N.device).index_add_(0, latent_idx_N, grad_N)
        if ctx.needs_input_grad[2]:
            # ∂W_enc[:, l] = Σ_{entries of latent l} g · x̃[b]: a fused gather-scale-sum grouped by latent.
            order = torch.argsort(latent_idx_N)
            counts_L = torch.bincount(latent_idx_N, minlength=ctx.d_sae)
            grad_W_LD = F.embedding_bag(
                batch_idx_N[order],
                x_tilde_BD,
                torch.cumsum(counts_L, 0) - counts_L,
                mode="sum",
                per_sample_weights=grad_N[order],
            )
            grad_W = grad_W_LD.t()
        if ctx.has_b_dec and ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc_DL @ grad_b_L)
        grad_b = grad_b_L if ctx.needs_input_grad[3] else None
        return None, grad_b_dec, grad_W, grad_b, None, None, None


def gather_pre_acts(
    sae: Any,
    x_tilde_BD: torch.Tensor,
    hidden_pre_BL: torch.Tensor,
    batch_idx_N: torch.Tensor,
    latent_idx_N: torch.Tensor,
) -> torch.Tensor:
    """h[batch_idx, latent_idx] with gradients to W_enc, b_enc and b_dec.

    `x_tilde_BD` (s·x − b_dec) and `hidden_pre_BL` (x̃ W_enc + b_enc) were computed without grad."""
    b_dec_D = sae.b_dec_D if sae.cfg.apply_b_dec_to_input else None
    return _GatherPreActs.apply(
        x_tilde_BD, b_dec_D, sae.W_enc_DL, sae.b_enc_L, hidden_pre_BL, batch_idx_N, latent_idx_N
    )


# Above this fraction of B·L entries, a sparse training path loses to dense matmuls.
SPARSE_MAX_DENSITY = 1 / 8


def per_sample_sum(values_N: torch.Tensor, batch_idx_N: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Σ of flat per-entry values within each sample, [B] (the sparse form of `.sum(dim=-1)`)."""
    return values_N.new_zeros(batch_size).index_add(0, batch_idx_N, values_N)


# ----- gathers of a product -------------------------------------------------------------------
def _sample_offsets(batch_idx_N: torch.Tensor, batch_size: int) -> torch.Tensor:
    counts_B = torch.bincount(batch_idx_N, minlength=batch_size)
    return torch.cumsum(counts_B, 0) - counts_B


class _GatherMatmul(torch.autograd.Function):
    """(A @ W)[batch_idx, latent_idx] from a precomputed dense product P = A @ W (no grad).

    Backward touches only the chosen entries (entries must be sample-major, as in `SparseActs`):
      ∂A[b] = Σ_{entries of b} g · W[:, l]   (embedding_bag over the rows of Wᵀ, bags = samples)
      ∂W[:, l] = Σ_{entries of l} g · A[b]   (embedding_bag over the rows of A, bags = latents)
    """

    @staticmethod
    def forward(ctx, A_BD, W_DL, P_BL, batch_idx_N, latent_idx_N):
        ctx.save_for_backward(A_BD, W_DL, batch_idx_N, latent_idx_N)
        return P_BL[batch_idx_N, latent_idx_N]

    @staticmethod
    def backward(ctx, grad_N):
        A_BD, W_DL, batch_idx_N, latent_idx_N = ctx.saved_tensors
        grad_A = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_A = F.embedding_bag(
                latent_idx_N,
                W_DL.t().contiguous(),
                _sample_offsets(batch_idx_N, A_BD.shape[0]),
                mode="sum",
                per_sample_weights=grad_N.to(W_DL.dtype),
            ).to(A_BD.dtype)
        if ctx.needs_input_grad[1]:
            L = W_DL.shape[1]
            order = torch.argsort(latent_idx_N)
            counts_L = torch.bincount(latent_idx_N, minlength=L)
            grad_W = (
                F.embedding_bag(
                    batch_idx_N[order],
                    A_BD,
                    torch.cumsum(counts_L, 0) - counts_L,
                    mode="sum",
                    per_sample_weights=grad_N[order].to(A_BD.dtype),
                )
                .t()
                .to(W_DL.dtype)
            )
        return grad_A, grad_W, None, None, None


def gather_matmul(
    A_BD: torch.Tensor, W_DL: torch.Tensor, P_BL: torch.Tensor, batch_idx_N: torch.Tensor, latent_idx_N: torch.Tensor
) -> torch.Tensor:
    """(A @ W) at the given (sample-major) entries, with gradients to A and W; P = A @ W precomputed."""
    return _GatherMatmul.apply(A_BD, W_DL, P_BL, batch_idx_N, latent_idx_N)


LS_MAX_SYSTEM_ELEMENTS = 2**24  # B·K² above this: the normal equations are solved in halves of the batch


def least_squares_values(x_BD: torch.Tensor, acts: SparseActs, U_LD: torch.Tensor, ridge: float) -> torch.Tensor:
    """OMP's projection step: per sample b, c_b = argmin_c ‖x_b − Σ_j c_j U_j‖² + ridge·‖c‖² over its
    active latents j, returned per entry of `acts` (same order); differentiable in x and U.

    One batch of padded [B, K, K] normal equations (K = most entries in one sample; padded slots get an
    identity row, so their coefficient is 0), solved by Cholesky. The systems are gathered from the
    full Gram U Uᵀ and x Uᵀ (dense matmuls; cheaper than B per-sample Grams once B·K² ≳ L²). Batches
    whose systems would exceed `LS_MAX_SYSTEM_ELEMENTS` are solved in halves, recursively."""
    if acts.latent_idx.numel() == 0:
        return x_BD.new_zeros(0)
    return _solve_on_support(x_BD.to(U_LD.dtype), acts, U_LD, U_LD @ U_LD.t(), ridge)


def _solve_on_support(x_BD, acts: SparseActs, U_LD, gram_LL, ridge: float) -> torch.Tensor:
    N, B, L = acts.latent_idx.numel(), acts.batch_size, acts.d_sae
    device, dtype = x_BD.device, U_LD.dtype
    counts_B = torch.bincount(acts.batch_idx, minlength=B)
    K = int(counts_B.max()) if N else 0
    if B > 1 and B * K * K > LS_MAX_SYSTEM_ELEMENTS:
        half = B // 2
        cut = int(counts_B[:half].sum())
        first = SparseActs(acts.batch_idx[:cut], acts.latent_idx[:cut], acts.values[:cut], half, L)
        second = SparseActs(acts.batch_idx[cut:] - half, acts.latent_idx[cut:], acts.values[cut:], B - half, L)
        return torch.cat(
            [
                _solve_on_support(x_BD[:half], first, U_LD, gram_LL, ridge),
                _solve_on_support(x_BD[half:], second, U_LD, gram_LL, ridge),
            ]
        )
    if N == 0:
        return x_BD.new_zeros(0)
    slot_N = torch.arange(N, device=device) - (torch.cumsum(counts_B, 0) - counts_B)[acts.batch_idx]
    latent_BK = torch.zeros(B, K, dtype=torch.long, device=device)
    latent_BK[acts.batch_idx, slot_N] = acts.latent_idx
    valid_BK = torch.zeros(B, K, dtype=torch.bool, device=device)
    valid_BK[acts.batch_idx, slot_N] = True
    pair_BKK = latent_BK.unsqueeze(2) * L + latent_BK.unsqueeze(1)
    gram_BKK = gram_LL.reshape(-1).index_select(0, pair_BKK.reshape(-1)).view(B, K, K)
    both_valid_BKK = valid_BK.unsqueeze(2) & valid_BK.unsqueeze(1)
    gram_BKK = gram_BKK * both_valid_BKK.to(dtype) + torch.diag_embed(ridge + (~valid_BK).to(dtype))
    rhs_BK = (x_BD @ U_LD.t()).gather(1, latent_BK) * valid_BK.to(dtype)
    chol_BKK, _ = torch.linalg.cholesky_ex(gram_BKK)
    coef_BK = torch.cholesky_solve(rhs_BK.unsqueeze(-1), chol_BKK).squeeze(-1)
    return coef_BK[acts.batch_idx, slot_N]
