"""Latents as binary detectors of their best-matching true feature (SynthSAEBench F1/P/R/accuracy).

Latent j detects g(j) = argmax_i |cos(W_dec[j], f_i)| (see `matching.py`; many latents may share
one feature). Over the eval samples b, with fires_bj = (act_bj ≠ 0) and gt_bj = (a_{b,g(j)} > 0):

    TP_j = Σ_b fires_bj·gt_bj     FP_j = Σ_b fires_bj·¬gt_bj
    FN_j = Σ_b ¬fires_bj·gt_bj    TN_j = Σ_b ¬fires_bj·¬gt_bj
    P_j = TP/(TP+FP), R_j = TP/(TP+FN), F1_j = 2·P_j·R_j/(P_j+R_j), Acc_j = (TP+TN)/n  (0 if undefined)

and each reported metric is the mean over ALL L latents (a dead latent has P = R = F1 = 0).

Signed matching (`sign_L`, what the ground-truth evaluations pass): a latent firing with code h writes
h·W_dec[j], i.e. the direction sign(h)·W_dec[j], so it detects g(j) only when that direction points
along f_g(j): hit_bj = (act_bj · s_j > 0) with s_j = sign cos(W_dec[j], f_g(j)). Then TP_j = Σ hit·gt,
FP_j = #fires − TP, FN_j = #gt − TP and TN_j = Σ ¬fires·¬gt: a firing that points away from its feature
(an AbsTopK code of the other sign, or a ReLU latent whose decoder row is −f) is a false claim, and a
miss when the feature is active. Nothing changes where every firing points along its feature (then
hit = fires; SynthSAEBench's definition, which ignores the sign).
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.errors import ConfigError, require


def _as_dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t


def count_columns(mask_BX: torch.Tensor) -> torch.Tensor:
    """Per-column count of True as int64 on the CPU.

    Summed in int32 (exact for any batch < 2³¹ rows; about 2× faster than int64 on CPU), then
    widened so totals over many batches cannot overflow."""
    return mask_BX.sum(dim=0, dtype=torch.int32).to(device="cpu", dtype=torch.int64)


def _safe_div(num_L: torch.Tensor, den_L: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (float64)."""
    num_L, den_L = num_L.double(), den_L.double()
    return torch.where(den_L > 0, num_L / den_L.clamp_min(1e-300), torch.zeros_like(num_L))


class ClassificationCalculator:
    """Streaming per-latent TP/FP/FN/TN counts (int64) of latent firing vs its matched feature firing.

    `compute()` returns the means over all latents — precision, recall, f1, accuracy — and the
    per-latent arrays precision_L, recall_L, f1_L, accuracy_L, tp_L, fp_L, fn_L, tn_L,
    best_match_L, plus n_samples. Formula: see the module docstring.
    """

    def __init__(self, best_match_L: torch.Tensor, num_features: int | None = None, sign_L: torch.Tensor | None = None):
        require(
            isinstance(best_match_L, torch.Tensor) and best_match_L.ndim == 1 and best_match_L.numel() > 0,
            "best_match_L",
            tuple(getattr(best_match_L, "shape", ())),
            "must be a non-empty 1-D tensor of feature indices",
        )
        self.best_match_L = best_match_L.detach().long().cpu()
        if num_features is not None:
            require(
                int(self.best_match_L.max()) < num_features and int(self.best_match_L.min()) >= 0,
                "best_match_L",
                (int(self.best_match_L.min()), int(self.best_match_L.max())),
                f"indices must lie in [0, {num_features})",
            )
        self.num_features = num_features
        L = self.best_match_L.shape[0]
        if sign_L is not None:
            require(
                isinstance(sign_L, torch.Tensor) and tuple(sign_L.shape) == (L,),
                "sign_L",
                tuple(getattr(sign_L, "shape", ())),
                f"must be a tensor [{L}] of ±1, one per latent",
            )
        # ±1 per latent (signed matching, module docstring); None: every firing counts for its feature.
        self.sign_L = None if sign_L is None else torch.where(sign_L.detach().cpu() < 0, -1.0, 1.0)
        self.tp_L = torch.zeros(L, dtype=torch.int64)
        self.fired_L = torch.zeros(L, dtype=torch.int64)  # TP + FP
        self.gt_L = torch.zeros(L, dtype=torch.int64)  # TP + FN
        self.both_L = torch.zeros(L, dtype=torch.int64)  # fires ∧ gt: TP, plus firings that point the other way
        self.n_samples = 0
        self._index_cache: dict[torch.device, torch.Tensor] = {}
        self._sign_cache: dict[torch.device, torch.Tensor] = {}

    @property
    def num_latents(self) -> int:
        return int(self.best_match_L.shape[0])

    def _index_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._index_cache:
            self._index_cache[device] = self.best_match_L.to(device)
        return self._index_cache[device]

    @torch.no_grad()
    def update(self, acts_BL: torch.Tensor, feature_acts_BF: torch.Tensor) -> None:
        """Add one batch: SAE codes [B, L] (nonzero = fires; with sign_L, their signs matter) and true activations
        [B, F] (> 0 = fires)."""
        acts_BL, feature_acts_BF = _as_dense(acts_BL), _as_dense(feature_acts_BF)
        L = self.num_latents
        if acts_BL.ndim != 2 or acts_BL.shape[1] != L:
            raise ConfigError("acts_BL", tuple(acts_BL.shape), f"must have shape [B, {L}]")
        if feature_acts_BF.ndim != 2 or feature_acts_BF.shape[0] != acts_BL.shape[0]:
            raise ConfigError(
                "feature_acts_BF", tuple(feature_acts_BF.shape), f"must have shape [{acts_BL.shape[0]}, F]"
            )
        if self.num_features is not None and feature_acts_BF.shape[1] != self.num_features:
            raise ConfigError(
                "feature_acts_BF", tuple(feature_acts_BF.shape), f"must have {self.num_features} feature columns"
            )
        fires_BL = acts_BL != 0
        # One [B, L] gather of each latent's matched feature column; no loop over latents.
        gt_BL = feature_acts_BF.index_select(1, self._index_on(feature_acts_BF.device)).to(fires_BL.device) > 0
        both_L = count_columns(fires_BL & gt_BL)
        if self.sign_L is None:
            self.tp_L += both_L
        else:
            if acts_BL.device not in self._sign_cache:
                self._sign_cache[acts_BL.device] = self.sign_L.to(acts_BL.device)
            hit_BL = acts_BL * self._sign_cache[acts_BL.device].to(acts_BL.dtype) > 0
            self.tp_L += count_columns(hit_BL & gt_BL)
        self.both_L += both_L
        self.fired_L += count_columns(fires_BL)
        self.gt_L += count_columns(gt_BL)
        self.n_samples += int(acts_BL.shape[0])

    def counts(self) -> dict[str, torch.Tensor]:
        """Per-latent int64 counts tp_L, fp_L, fn_L, tn_L (with sign_L, a firing that points away from its feature
        while the feature is active is in both fp_L and fn_L, so the four may sum to more than n)."""
        tp_L = self.tp_L.clone()
        fp_L = self.fired_L - self.tp_L
        fn_L = self.gt_L - self.tp_L
        tn_L = self.n_samples - self.fired_L - self.gt_L + self.both_L  # neither fires nor active
        return {"tp_L": tp_L, "fp_L": fp_L, "fn_L": fn_L, "tn_L": tn_L}

    def compute(self) -> dict[str, Any]:
        c = self.counts()
        tp_L, fp_L, fn_L, tn_L = c["tp_L"], c["fp_L"], c["fn_L"], c["tn_L"]
        precision_L = _safe_div(tp_L, tp_L + fp_L)
        recall_L = _safe_div(tp_L, tp_L + fn_L)
        f1_L = _safe_div(2 * precision_L * recall_L, precision_L + recall_L)
        accuracy_L = _safe_div(tp_L + tn_L, torch.full_like(tp_L, self.n_samples))  # samples where they agree
        return {
            "precision": float(precision_L.mean()),
            "recall": float(recall_L.mean()),
            "f1": float(f1_L.mean()),
            "accuracy": float(accuracy_L.mean()),
            "n_samples": self.n_samples,
            "precision_L": precision_L,
            "recall_L": recall_L,
            "f1_L": f1_L,
            "accuracy_L": accuracy_L,
            **c,
            "best_match_L": self.best_match_L.clone(),
        }


class TrueFiringCalculator:
    """Streaming true-feature firing counts: count_F[i] = Σ_b (a_bi > 0).

    true L0 = Σ_i count_F[i] / n (mean #(a > 0) per sample); firing_frequency_F = count_F / n.
    """

    def __init__(self, num_features: int | None = None):
        self.num_features = num_features
        self.count_F: torch.Tensor | None = None
        self.n_samples = 0

    @torch.no_grad()
    def update(self, feature_acts_BF: torch.Tensor) -> None:
        feature_acts_BF = _as_dense(feature_acts_BF)
        F = self.num_features if self.num_features is not None else feature_acts_BF.shape[-1]
        if feature_acts_BF.ndim != 2 or feature_acts_BF.shape[1] != F:
            raise ConfigError("feature_acts_BF", tuple(feature_acts_BF.shape), f"must have shape [B, {F}]")
        if self.count_F is None:
            self.count_F = torch.zeros(F, dtype=torch.int64)
            self.num_features = F
        self.count_F += count_columns(feature_acts_BF > 0)
        self.n_samples += int(feature_acts_BF.shape[0])

    def compute(self) -> dict[str, Any]:
        n = self.n_samples
        count_F = self.count_F if self.count_F is not None else torch.zeros(0, dtype=torch.int64)
        return {
            "true_l0": float(count_F.sum()) / n if n else 0.0,
            "firing_count_F": count_F.clone(),
            "firing_frequency_F": count_F.double() / n if n else torch.zeros_like(count_F, dtype=torch.float64),
            "n_samples": n,
        }


def per_true_feature_recall(
    best_match_L: torch.Tensor,
    recall_L: torch.Tensor,
    num_features: int,
    firing_frequency_F: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per true feature i: best_recall_F[i] = max_{j: g(j) = i} recall_j (0 if no latent matches i),
    n_latents_F[i] = #{j: g(j) = i}, and firing_frequency_F (passed through, for plotting against).
    """
    best_match_L = best_match_L.detach().long().cpu()
    recall_L = recall_L.detach().double().cpu()
    require(
        best_match_L.shape == recall_L.shape and best_match_L.ndim == 1,
        "recall_L",
        tuple(recall_L.shape),
        f"must match best_match_L's shape {tuple(best_match_L.shape)}",
    )
    require(isinstance(num_features, int) and num_features > 0, "num_features", num_features, "must be positive")
    best_recall_F = torch.zeros(num_features, dtype=torch.float64)
    # Recall is ≥ 0, so amax with a zero start gives 0 for features no latent matched.
    best_recall_F.scatter_reduce_(0, best_match_L, recall_L, reduce="amax", include_self=True)
    n_latents_F = torch.bincount(best_match_L, minlength=num_features)
    out = {"best_recall_F": best_recall_F, "n_latents_F": n_latents_F}
    if firing_frequency_F is not None:
        require(
            firing_frequency_F.shape == (num_features,),
            "firing_frequency_F",
            tuple(firing_frequency_F.shape),
            f"must have shape [{num_features}]",
        )
        out["firing_frequency_F"] = firing_frequency_F.detach().double().cpu()
    return out
