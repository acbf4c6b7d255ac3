"""The "Sparse but Wrong" mechanism experiment: SAEs started exactly at the true features drift
away from them when trained at too low an L0, and stay at the true L0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def feature_mixing(W_dec_LD: torch.Tensor, feats_FD: torch.Tensor) -> dict[str, float]:
    """For an SAE whose latent j was initialised at feature j: mean cos(d̂_j, f_j) ('self'), mean
    mixing 1 − cos² (the share of the decoder row off its own feature), and the mean |cos| of d̂_j
    with the other features (baseline: the features' own mean |cos|)."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L = min(d.shape[0], f.shape[0])
    c = d[:L] @ f.T
    self_cos = c[torch.arange(L), torch.arange(L)]
    off = c.abs()
    off[torch.arange(L), torch.arange(L)] = 0.0
    return {
        "self_cos": float(self_cos.mean()),
        "mixing": float((1 - self_cos**2).mean()),
        "off_target_abs_cos": float(off.sum() / (L * (f.shape[0] - 1))),
    }


def ground_truth_init_drift(
    model: Any,
    l0s: Sequence[int] = (5, 11),
    samples: int = 1_000_000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 100,
    arch: str = "batchtopk",
) -> dict[float, list[dict[str, float]]]:
    """The "Sparse but Wrong" mechanism: SAEs (width = number of true features) initialised exactly
    at the true features and trained at each L0. Returns, per L0, the trajectory of
    `feature_mixing` (step 0 included): too low an L0 drifts away from the features, the true L0 stays."""
    from saelab.data import SyntheticSource
    from saelab.saes.registry import get_sae_class
    from saelab.training.trainer import TrainConfig, Trainer

    feats = model.feature_vectors_FD.detach().float()
    F, D = feats.shape
    cls = get_sae_class(arch)
    saes = {}
    for l0 in l0s:
        cfg = cls.config_for_l0(D, F, float(l0), max(1, samples // batch_size))
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec_LD.copy_(feats)
            sae.W_enc_DL.copy_(feats.T)
            sae.b_enc_L.zero_()
            sae.b_dec_D.copy_(model.bias_D.detach().float())
        saes[f"l0_{l0:g}"] = sae
    history: dict[float, list[dict[str, float]]] = {float(l0): [] for l0 in l0s}

    def record(step: int, current: dict[str, Any]) -> dict[str, dict[str, float]]:
        out = {}
        for l0 in l0s:
            m = feature_mixing(current[f"l0_{l0:g}"].W_dec_LD, feats)
            history[float(l0)].append({"step": step, **m})
            out[f"l0_{l0:g}"] = m
        return out

    record(0, saes)
    trainer = Trainer(
        saes,
        SyntheticSource(model, seed),
        TrainConfig(samples=samples, batch_size=batch_size, lr=lr, seed=seed),
        eval_fn=None,
        progress=False,
    )
    trainer.eval_fn = lambda current: record(trainer.step, current)
    trainer.eval_every = eval_every
    trainer.train()
    record(trainer.step, trainer.saes)
    return history
