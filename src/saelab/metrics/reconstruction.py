"""Reconstruction and sparsity metrics that need no ground truth, as streaming calculators.

Each calculator has `update(...)` per batch and `compute()`; sums are kept in float64 / int64 on
the CPU so the result does not depend on how the samples were split into batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from saelab.errors import ConfigError, require
from saelab.metrics.classification import count_columns


def _check_pair(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
    if x_BD.ndim != 2:
        raise ConfigError("x_BD", tuple(x_BD.shape), "must be a 2-D tensor [B, D]")
    if x_hat_BD.shape != x_BD.shape:
        raise ConfigError("x_hat_BD", tuple(x_hat_BD.shape), f"must have the input's shape {tuple(x_BD.shape)}")


class ExplainedVarianceCalculator:
    """EV = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²): variance about the mean, not about 0 (SAELens #665).

    The denominator is accumulated as Σ‖x − x̄‖² with Chan's parallel merge in float64, which is the
    same quantity as n·(E‖x‖² − ‖E x‖²) without the cancellation of subtracting two large numbers.
    If the total variance is < 1e-10 the result is 1 when the MSE is also < 1e-10, else 0 (as SAELens).
    """

    def __init__(self) -> None:
        self.n_samples = 0
        self.mean_D: torch.Tensor | None = None
        self.m2 = 0.0  # Σ‖x − x̄‖² over all samples seen
        self.sum_sq_err = 0.0

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        _check_pair(x_BD, x_hat_BD)
        n_b = int(x_BD.shape[0])
        if n_b == 0:
            return
        x64_BD = x_BD.detach().to(torch.float64)
        self.sum_sq_err += float((x64_BD - x_hat_BD.detach().to(torch.float64)).pow(2).sum())
        mean_b_D = x64_BD.mean(dim=0)
        m2_b = float((x64_BD - mean_b_D).pow(2).sum())
        mean_b_D = mean_b_D.cpu()
        if self.mean_D is None:
            self.mean_D, self.m2 = mean_b_D, m2_b
        else:
            n_a = self.n_samples
            n = n_a + n_b
            delta_D = mean_b_D - self.mean_D
            self.m2 += m2_b + float(delta_D.pow(2).sum()) * n_a * n_b / n
            self.mean_D = self.mean_D + delta_D * (n_b / n)
        self.n_samples += n_b

    def total_variance(self) -> float:
        """E‖x‖² − ‖E x‖² = Σ‖x − x̄‖² / n."""
        return self.m2 / self.n_samples if self.n_samples else 0.0

    def mse(self) -> float:
        """E‖x − x̂‖² (squared error summed over dimensions, mean over samples)."""
        return self.sum_sq_err / self.n_samples if self.n_samples else 0.0

    def compute(self) -> float:
        if self.n_samples == 0:
            return 0.0
        var, mse = self.total_variance(), self.mse()
        if var < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / var


class MSECalculator:
    """MSE = (1/n) Σ_b ‖x_b − x̂_b‖² (sum over dimensions, mean over samples; SAELens's convention)."""

    def __init__(self) -> None:
        self.sum_sq_err = 0.0
        self.n_samples = 0

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        _check_pair(x_BD, x_hat_BD)
        diff = x_BD.detach().to(torch.float64) - x_hat_BD.detach().to(torch.float64)
        self.sum_sq_err += float(diff.pow(2).sum())
        self.n_samples += int(x_BD.shape[0])

    def compute(self) -> float:
        return self.sum_sq_err / self.n_samples if self.n_samples else 0.0


class ShrinkageCalculator:
    """shrinkage = mean over samples with ‖x_b‖ > min_input_norm of ‖x̂_b‖ / ‖x_b‖ (1 = no shrinkage).

    Samples with ‖x‖ ≤ min_input_norm (default 1e-6) are skipped: the ratio is undefined there.
    """

    def __init__(self, min_input_norm: float = 1e-6) -> None:
        require(min_input_norm >= 0, "min_input_norm", min_input_norm, "must be non-negative")
        self.min_input_norm = min_input_norm
        self.sum_ratio = 0.0
        self.n_samples = 0  # samples that counted

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        _check_pair(x_BD, x_hat_BD)
        norm_B = x_BD.detach().to(torch.float64).norm(dim=1)
        keep_B = norm_B > self.min_input_norm
        hat_norm_B = x_hat_BD.detach().to(torch.float64).norm(dim=1)
        self.sum_ratio += float((hat_norm_B[keep_B] / norm_B[keep_B]).sum())
        self.n_samples += int(keep_B.sum())

    def compute(self) -> float:
        return self.sum_ratio / self.n_samples if self.n_samples else 0.0


class L0Calculator:
    """L0 = (1/n) Σ_b #{j : act_bj ≠ 0} (≠ 0, so signed codes such as AbsTopK's count as firing)."""

    def __init__(self) -> None:
        self.n_active = 0
        self.n_samples = 0

    @torch.no_grad()
    def update(self, acts_BL: torch.Tensor) -> None:
        if acts_BL.layout != torch.strided:
            acts_BL = acts_BL.to_dense()
        if acts_BL.ndim != 2:
            raise ConfigError("acts_BL", tuple(acts_BL.shape), "must be a 2-D tensor [B, L]")
        self.n_active += int((acts_BL != 0).sum())
        self.n_samples += int(acts_BL.shape[0])

    def compute(self) -> float:
        return self.n_active / self.n_samples if self.n_samples else 0.0


class DeadLatentsCalculator:
    """dead = #{j : act_bj = 0 for every sample b seen}. Also keeps fire_count_L = Σ_b (act_bj ≠ 0)."""

    def __init__(self, num_latents: int) -> None:
        require(isinstance(num_latents, int) and num_latents > 0, "num_latents", num_latents, "must be positive")
        self.fire_count_L = torch.zeros(num_latents, dtype=torch.int64)
        self.n_samples = 0

    @torch.no_grad()
    def update(self, acts_BL: torch.Tensor) -> None:
        if acts_BL.layout != torch.strided:
            acts_BL = acts_BL.to_dense()
        L = self.fire_count_L.shape[0]
        if acts_BL.ndim != 2 or acts_BL.shape[1] != L:
            raise ConfigError("acts_BL", tuple(acts_BL.shape), f"must have shape [B, {L}]")
        self.fire_count_L += count_columns(acts_BL != 0)
        self.n_samples += int(acts_BL.shape[0])

    def compute(self) -> int:
        return int((self.fire_count_L == 0).sum())


class ReconstructionCalculator:
    """All the no-ground-truth metrics in one `update(x_BD, acts_BL, x_hat_BD)`.

    compute() → {explained_variance, mse, shrinkage, l0, dead_latents, n_samples}; each value is the
    formula of the calculator of the same name above.
    """

    def __init__(self, num_latents: int, min_input_norm: float = 1e-6) -> None:
        self.ev = ExplainedVarianceCalculator()  # also yields the MSE (same residual)
        self.shrinkage = ShrinkageCalculator(min_input_norm)
        self.dead = DeadLatentsCalculator(num_latents)  # its per-latent counts also give L0

    def update(self, x_BD: torch.Tensor, acts_BL: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        self.ev.update(x_BD, x_hat_BD)
        self.shrinkage.update(x_BD, x_hat_BD)
        self.dead.update(acts_BL)

    def compute(self) -> dict[str, Any]:
        return {
            "explained_variance": self.ev.compute(),
            "mse": self.ev.mse(),
            "shrinkage": self.shrinkage.compute(),
            # Σ_j fire_count_j / n = mean #nonzero per sample (L0Calculator's formula, one pass fewer).
            "l0": int(self.dead.fire_count_L.sum()) / self.dead.n_samples if self.dead.n_samples else 0.0,
            "dead_latents": self.dead.compute(),
            "n_samples": self.ev.n_samples,
        }


# ----- running an SAE over batches ---------------------------------------------------------------


class _SAEDims(Protocol):
    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...


class SAELike(Protocol):
    """What the metrics read from an SAE: `cfg.d_in`, `cfg.d_sae`, `W_dec_LD` [d_sae, d_in], `encode`
    (dense codes, or a SparseActs) and `decode`. A saelab `SAE` is one; so is any object with these."""

    @property
    def cfg(self) -> _SAEDims: ...

    @property
    def W_dec_LD(self) -> torch.Tensor: ...

    def encode(self, x_BD: torch.Tensor, /) -> Any: ...

    def decode(self, acts_BL: torch.Tensor, /) -> torch.Tensor: ...


def sae_dims(sae: SAELike) -> tuple[int, int]:
    """(d_in, d_sae) from `sae.cfg`, checked against `sae.W_dec_LD`'s shape."""
    cfg = getattr(sae, "cfg", None)
    d_in, d_sae = getattr(cfg, "d_in", None), getattr(cfg, "d_sae", None)
    require(isinstance(d_in, int) and d_in > 0, "d_in", d_in, "sae.cfg.d_in must be a positive integer")
    require(isinstance(d_sae, int) and d_sae > 0, "d_sae", d_sae, "sae.cfg.d_sae must be a positive integer")
    W_dec_LD = getattr(sae, "W_dec_LD", None)
    require(
        isinstance(W_dec_LD, torch.Tensor) and tuple(W_dec_LD.shape) == (d_sae, d_in),
        "W_dec_LD",
        tuple(getattr(W_dec_LD, "shape", ())),
        f"sae.W_dec_LD must have shape [d_sae, d_in] = [{d_sae}, {d_in}]",
    )
    assert isinstance(d_in, int) and isinstance(d_sae, int)  # checked above
    return d_in, d_sae


def resolve_device(sae: SAELike, device: str | torch.device | None) -> torch.device:
    """The SAE's device, or `device` if given and equal to it (the SAE is never moved behind your back)."""
    sae_device = sae.W_dec_LD.device
    if device is None:
        return sae_device
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("device", device, f"not a torch device: {err}") from None
    same = wanted.type == sae_device.type and (wanted.index is None or wanted.index == sae_device.index)
    require(same, "device", str(device), f"the SAE's parameters are on {sae_device}; move the SAE there first")
    return sae_device


def encode_decode(sae: SAELike, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts_BL, x_hat_BD) with dense codes; accepts SAEs whose encode returns a SparseActs."""
    acts = sae.encode(x_BD)
    if hasattr(acts, "to_dense") and not isinstance(acts, torch.Tensor):
        acts = acts.to_dense()
    elif acts.layout != torch.strided:
        acts = acts.to_dense()
    return acts, sae.decode(acts)


class _EvalMode:
    """Put an nn.Module SAE in eval mode for the duration, then restore its previous mode."""

    def __init__(self, sae: object):
        self.sae = sae
        self.was_training = getattr(sae, "training", None)

    def __enter__(self) -> None:
        if isinstance(self.sae, torch.nn.Module):
            self.sae.eval()

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.sae, torch.nn.Module) and self.was_training:
            self.sae.train(True)


@torch.no_grad()
def evaluate_reconstruction(
    sae: SAELike,
    batches: Iterable[torch.Tensor],
    *,
    device: str | torch.device | None = None,
    min_input_norm: float = 1e-6,
) -> dict[str, Any]:
    """Stream [B, D] activation batches through the SAE; return the no-ground-truth metrics.

    Keys: explained_variance, mse, shrinkage, l0, dead_latents (never fired on these batches),
    n_samples. Formulas: see the calculators in this module. Only one batch is held at a time.
    """
    d_in, d_sae = sae_dims(sae)
    dev = resolve_device(sae, device)
    calc = ReconstructionCalculator(d_sae, min_input_norm)
    with _EvalMode(sae):
        for i, x_BD in enumerate(batches):
            if not isinstance(x_BD, torch.Tensor) or x_BD.ndim != 2 or x_BD.shape[1] != d_in:
                raise ConfigError(
                    f"batches[{i}]", tuple(getattr(x_BD, "shape", ())), f"each batch must be a tensor [B, {d_in}]"
                )
            x_BD = x_BD.to(dev)
            acts_BL, x_hat_BD = encode_decode(sae, x_BD)
            calc.update(x_BD, acts_BL, x_hat_BD)
    result = calc.compute()
    require(result["n_samples"] > 0, "batches", "empty", "yielded no samples")
    return result
