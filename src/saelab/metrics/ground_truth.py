"""Evaluate an SAE against a synthetic model's known features (the SynthSAEBench metric set).

One pass over freshly sampled batches (never all samples at once) plus the decoder-only matching:

    f1, precision, recall, accuracy   mean over all latents, latent j detecting g(j) = argmax_i |cos(d̂_j, f_i)|
                                      (signed matching, metrics.classification: a latent fires when its
                                      code is ≠ 0 and detects g(j) when its code's sign makes h·d̂_j point
                                      along f_g(j); an AbsTopK code of the other sign writes −f and counts
                                      as a false claim. SynthSAEBench ignores the sign; the two agree
                                      whenever every firing points along its feature, e.g. any ReLU SAE
                                      whose decoder rows are not antiparallel to their matches)
    mcc                               mean |cos| over the Hungarian one-to-one matching (min(L, F) pairs)
    uniqueness                        #unique best matches / L
    explained_variance                1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)
    shrinkage                         mean ‖x̂‖/‖x‖ (‖x‖ > 1e-6)
    l0, true_l0                       mean #(act ≠ 0) (negative codes fire), mean #(a > 0) per sample
    dead_latents                      #latents that never fired on the eval samples
    mse                               mean over samples of ‖x − x̂‖² (summed over dimensions)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError, require
from saelab.metrics.classification import (
    ClassificationCalculator,
    TrueFiringCalculator,
    _as_dense,
    per_true_feature_recall,
)
from saelab.metrics.matching import match_decoder_to_features
from saelab.metrics.names import GROUND_TRUTH, RECONSTRUCTION, metric_keys
from saelab.metrics.reconstruction import (
    ReconstructionCalculator,
    SAELike,
    _EvalMode,
    encode_decode,
    resolve_device,
    sae_dims,
)
from saelab.seeding import seeded_sampling

# The result's scalar metrics, in the registry's order (its JSON order), plus the sample count.
_SCALAR_FIELDS = (*metric_keys(GROUND_TRUTH, RECONSTRUCTION), "n_samples")


@dataclass
class GroundTruthResult:
    """Scalar metrics of one evaluation (formulas in the module docstring).

    `diagnostics` (not part of `to_dict`, equality or repr) holds the per-latent and per-feature
    tensors: best_match_L, best_cos_L, hungarian_feature_L, hungarian_cos_L, tp_L/fp_L/fn_L/tn_L,
    precision_L, recall_L, f1_L, accuracy_L, fire_count_L, firing_count_F, firing_frequency_F.
    """

    f1: float
    precision: float
    recall: float
    accuracy: float
    mcc: float
    uniqueness: float
    explained_variance: float
    shrinkage: float
    l0: float
    true_l0: float
    dead_latents: int
    mse: float
    n_samples: int
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int]:
        """The scalar metrics only (JSON-ready)."""
        return {name: getattr(self, name) for name in _SCALAR_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundTruthResult:
        """Inverse of `to_dict` (unknown keys ignored; no diagnostics)."""
        missing = [name for name in _SCALAR_FIELDS if name not in data]
        if missing:
            raise ConfigError("result", missing, "missing metric fields")
        return cls(**{name: data[name] for name in _SCALAR_FIELDS})

    def true_feature_recall(self) -> dict[str, torch.Tensor]:
        """Per true feature: best recall among latents matched to it (0 if none), #latents matched,
        and its true firing frequency. See `per_true_feature_recall`."""
        d = self.diagnostics
        require(bool(d), "diagnostics", "empty", "this result carries no per-latent diagnostics")
        freq_F = d["firing_frequency_F"]
        return per_true_feature_recall(d["best_match_L"], d["recall_L"], int(freq_F.shape[0]), freq_F)


def _check_model(model: Any) -> tuple[int, int, torch.Tensor]:
    F, D = getattr(model, "num_features", None), getattr(model, "hidden_dim", None)
    require(isinstance(F, int) and F > 0, "num_features", F, "model.num_features must be a positive integer")
    require(isinstance(D, int) and D > 0, "hidden_dim", D, "model.hidden_dim must be a positive integer")
    feats_FD = getattr(model, "feature_vectors_FD", None)
    require(
        isinstance(feats_FD, torch.Tensor) and tuple(feats_FD.shape) == (F, D),
        "feature_vectors_FD",
        tuple(getattr(feats_FD, "shape", ())),
        f"model.feature_vectors_FD must have shape [num_features, hidden_dim] = [{F}, {D}]",
    )
    assert isinstance(F, int) and isinstance(D, int) and isinstance(feats_FD, torch.Tensor)  # checked above
    return F, D, feats_FD.detach()


def match_signs(W_dec_LD: torch.Tensor, feature_vectors_FD: torch.Tensor, best_match_L: torch.Tensor) -> torch.Tensor:
    """s_L = sign cos(W_dec[l], f_g(l)) for each latent's best match g (±1, float64 on the CPU; a row orthogonal to
    its match, e.g. all zeros, gets +1). A code h > 0 of latent l then writes along f_g(l) when s_l = +1, a code
    h < 0 when s_l = −1 (`ClassificationCalculator`'s signed matching)."""
    idx_L = best_match_L.to(feature_vectors_FD.device)
    dot_L = (W_dec_LD.detach().double() * feature_vectors_FD.detach().double()[idx_L].to(W_dec_LD.device)).sum(dim=1)
    return torch.where(dot_L.cpu() < 0, -1.0, 1.0).double()


def _positive_int(name: str, value: Any) -> int:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "must be a positive integer"
    )
    return value


def _seeded(model: Any, seed: int | None, devices: list[torch.device]) -> contextlib.AbstractContextManager[None]:
    """Seed sampling for the duration (`seeded_sampling`), then put every RNG back as it was; no-op without a seed."""
    if seed is None:
        return contextlib.nullcontext()
    return seeded_sampling(model, seed, cuda_devices=sorted({d.index or 0 for d in devices if d.type == "cuda"}))


@torch.no_grad()
def evaluate_sae_on_synthetic(
    sae: SAELike,
    model: Any,
    n_samples: int,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    seed: int | None = None,
    *,
    chunk_size: int | None = None,
) -> GroundTruthResult:
    """Sample `n_samples` activations from `model` in batches and score `sae` against the true features.

    `device`: where the samples go and the metrics run; defaults to (and must equal) the SAE's
    device. `seed`: if given, sampling is reproducible — the global torch RNG and the model's own
    `generator` (if it has one) are seeded for this call and restored afterwards, so the model's
    stream is left where it was. `chunk_size`: rows per |cos| chunk (see `matching`).
    """
    n_samples = _positive_int("n_samples", n_samples)
    batch_size = _positive_int("batch_size", batch_size)
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), "seed", seed, "must be an int")
    d_in, d_sae = sae_dims(sae)
    F, D, feats_FD = _check_model(model)
    require(d_in == D, "d_in", d_in, f"the SAE's d_in must equal the synthetic model's hidden_dim ({D})")
    dev = resolve_device(sae, device)

    match = match_decoder_to_features(sae.W_dec_LD.detach(), feats_FD.to(dev), hungarian=True, chunk_size=chunk_size)
    signs_L = match_signs(sae.W_dec_LD, feats_FD.to(dev), match.best_match_L)
    classification = ClassificationCalculator(match.best_match_L, num_features=F, sign_L=signs_L)
    truth = TrueFiringCalculator(F)
    recon = ReconstructionCalculator(d_sae)

    with _seeded(model, seed, [dev, feats_FD.device]), _EvalMode(sae):
        done = 0
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            hidden_BD, feature_acts_BF = model.sample_with_features(b)
            if tuple(hidden_BD.shape) != (b, D) or tuple(feature_acts_BF.shape) != (b, F):
                raise ConfigError(
                    "sample_with_features",
                    (tuple(hidden_BD.shape), tuple(feature_acts_BF.shape)),
                    f"model must return hidden [{b}, {D}] and feature activations [{b}, {F}]",
                )
            hidden_BD = hidden_BD.to(dev)
            feature_acts_BF = _as_dense(feature_acts_BF).to(dev)  # densify once, not per calculator
            acts_BL, x_hat_BD = encode_decode(sae, hidden_BD)
            recon.update(hidden_BD, acts_BL, x_hat_BD)
            classification.update(acts_BL, feature_acts_BF)
            truth.update(feature_acts_BF)
            done += b

    cls = classification.compute()
    rec = recon.compute()
    tru = truth.compute()
    assert match.mcc is not None and match.hungarian_feature_L is not None and match.hungarian_cos_L is not None
    diagnostics = {
        "best_match_L": match.best_match_L,
        "best_cos_L": match.best_cos_L,
        "hungarian_feature_L": match.hungarian_feature_L,
        "hungarian_cos_L": match.hungarian_cos_L,
        **{k: v for k, v in cls.items() if k.endswith("_L") and k != "best_match_L"},
        "fire_count_L": recon.dead.fire_count_L.clone(),
        "firing_count_F": tru["firing_count_F"],
        "firing_frequency_F": tru["firing_frequency_F"],
    }
    return GroundTruthResult(
        f1=cls["f1"],
        precision=cls["precision"],
        recall=cls["recall"],
        accuracy=cls["accuracy"],
        mcc=match.mcc,
        uniqueness=match.uniqueness,
        explained_variance=rec["explained_variance"],
        shrinkage=rec["shrinkage"],
        l0=rec["l0"],
        true_l0=tru["true_l0"],
        dead_latents=rec["dead_latents"],
        mse=rec["mse"],
        n_samples=rec["n_samples"],
        diagnostics=diagnostics,
    )
