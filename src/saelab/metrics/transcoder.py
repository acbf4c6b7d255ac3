"""Ground-truth metrics for transcoders on a transcoder world (`saelab.synthetic.transcoder`).

The transcoder (any object) provides
    encode(x_BD) -> acts_BL            latent codes (dense tensor, or anything with `to_dense()`)
    decode(acts_BL) -> [B, d_out]      acts @ W_dec + b_dec, WITHOUT the skip (SAELens's convention)
    W_dec_LE                           decoder rows in output space [L, d_out]
    W_skip_ED (optional)               skip matrix [d_out, d_in], or None / absent for no skip
and predicts ŷ = decode(encode(x)) + x W_skip_EDᵀ. The world provides `sample_with_features(B)` ->
(x_BD, y_BE, acts_BF, codes_BF) with output codes c ≥ 0, `u_out_FE`, `skip_ED`, `d_out` and
`computing_features()` / `output_kinds()` / `fanout_merged_direction()` (the world module).

One streaming pass over fresh batches (never all samples at once) plus decoder-only matching.
A latent l *fires* on a sample when its code is ≠ 0 (AbsTopK's codes are signed); output feature m fires
when c_m ≠ 0. Matching is signed, as for SAEs (metrics.classification): a code h writes h·W_dec[l], so
l detects a direction u only when sign(h)·cos(W_dec[l], u) > 0; a firing that points the other way
counts among l's firings (a false claim) but never as a detection. Decoder-only scores (mcc,
uniqueness, the |cos| candidates below) use |cos|, since only the codes carry the sign.

    f1, precision, recall, accuracy   SynthSAEBench's per-latent classification (metrics.classification)
                                      with latent l detecting g(l) = argmax_m |cos(W_dec[l], u_m)|:
                                      mean over ALL latents (dead latents count 0)
    mcc                               mean |cos| over the Hungarian one-to-one matching of decoder rows
                                      to the u_m (metrics.matching), min(L, F_out) pairs
    uniqueness                        #distinct g(l) / L
    fvu                               E‖y − ŷ‖² / (E‖y‖² − ‖E y‖²): variance about the mean (= 1 − EV);
                                      the true map reaches noise_var_fraction (synthetic.transcoder_stats)
    skip_rel_error                    ‖Ŝ − S‖_F / ‖S‖_F; None when the transcoder has no skip or S = 0.
                                      Not 0 even for an ideal transcoder: where latents cannot
                                      represent part of the map, a linear skip absorbs its best
                                      linear fit.
    skip_norm                         ‖Ŝ‖_F (None without a skip)
    computing_features_recovered      share of computing output features (AND, suppression, fanout
                                      outputs) that got a latent of their own: m is recovered when
                                      some latent l has |cos(W_dec[l], u_m)| ≥ COS_THRESHOLD (0.9) and
                                      F1 of l's firing against m's firing ≥ F1_THRESHOLD (0.5), with
                                      F1_lm = 2 TP_lm / (#fires_l + #fires_m) (0 when both are 0) and
                                      TP_lm = #(m fires and l fires pointing along u_m).
                                      None when the world has no computing outputs.
    and_recovered, suppression_recovered, fanout_recovered    the same share within each kind
    fanout_merged_recovered           share of fanout sources i that got ONE latent for both outputs:
                                      |cos(W_dec[l], w_i)| ≥ 0.9 with w_i ∝ g u_j + g' u_j' and F1
                                      against i's firing ≥ 0.5. y cannot tell the two readings apart
                                      (see the world module): a sparse transcoder is expected to merge.
    l0, dead_latents                  mean #(act ≠ 0) per sample; latents that never fired
    true_l0                           mean #(c_m ≠ 0) per sample (output features)
    mse                               mean ‖y − ŷ‖² (summed over dimensions)

The thresholds are those of a feature being "found" in SynthSAEBench-style analyses: 0.9 keeps a
match unambiguous (two u's at |cos| ≤ 0.6 cannot both be within 0.9 of one row), and F1 ≥ 0.5 asks
that the latent's firing agree with the feature's more often than not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError, require
from saelab.metrics.classification import ClassificationCalculator, TrueFiringCalculator, _as_dense, count_columns
from saelab.metrics.ground_truth import match_signs
from saelab.metrics.matching import iter_abs_cos, match_decoder_to_features
from saelab.metrics.reconstruction import ReconstructionCalculator, _EvalMode
from saelab.seeding import seeded_sampling

COS_THRESHOLD = 0.9
F1_THRESHOLD = 0.5
_KIND_KEYS = ("and", "suppression", "fanout")
# Candidate (latent, target) pairs counted per chunk: bounds the B × P boolean temporary.
_PAIR_CHUNK = 4096


@dataclass
class TranscoderResult:
    """Scalar metrics of one transcoder evaluation (formulas in the module docstring).

    `diagnostics` (not in `to_dict`, equality or repr): best_match_L, best_cos_L,
    hungarian_feature_L, hungarian_cos_L, f1_L, precision_L, recall_L, fire_count_L,
    firing_count_F (output features), computing_F (indices), computing_recovered_F (bool),
    fanout_merged_recovered_N (bool), y_total_variance (0-d tensor).
    """

    f1: float
    precision: float
    recall: float
    accuracy: float
    mcc: float
    uniqueness: float
    fvu: float
    skip_rel_error: float | None
    skip_norm: float | None
    computing_features_recovered: float | None
    and_recovered: float | None
    suppression_recovered: float | None
    fanout_recovered: float | None
    fanout_merged_recovered: float | None
    l0: float
    dead_latents: int
    true_l0: float
    mse: float
    n_samples: int
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The scalar metrics only (JSON-ready; None stays None)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "diagnostics"}


class PairFiringCalculator:
    """Streaming TP_P = Σ_b hit[b, P] ∧ gt[b, column_P] for a list of (latent, column) pairs, where
    hit = acts[b, latent_P] ≠ 0, or with `sign_P` (signed matching) acts[b, latent_P] · sign_P > 0."""

    def __init__(self, latent_P: torch.Tensor, column_P: torch.Tensor, sign_P: torch.Tensor | None = None):
        require(
            latent_P.shape == column_P.shape and latent_P.ndim == 1,
            "pairs",
            tuple(latent_P.shape),
            "latent and column index lists must be 1-D and of equal length",
        )
        require(
            sign_P is None or tuple(sign_P.shape) == tuple(latent_P.shape),
            "sign_P",
            tuple(getattr(sign_P, "shape", ())),
            "must have one sign per pair",
        )
        self.latent_P, self.column_P = latent_P.long().cpu(), column_P.long().cpu()
        self.sign_P = None if sign_P is None else torch.where(sign_P.cpu() < 0, -1.0, 1.0)
        self.tp_P = torch.zeros(self.latent_P.numel(), dtype=torch.int64)

    @torch.no_grad()
    def update(self, acts_BL: torch.Tensor, gt_BF: torch.Tensor) -> None:
        """acts_BL: codes (or a boolean firing mask, without signs); gt_BF: boolean, True where the column fires."""
        for start in range(0, self.latent_P.numel(), _PAIR_CHUNK):
            lat = self.latent_P[start : start + _PAIR_CHUNK].to(acts_BL.device)
            col = self.column_P[start : start + _PAIR_CHUNK].to(gt_BF.device)
            acts_BP = acts_BL.index_select(1, lat)
            if self.sign_P is None:
                hit_BP = acts_BP != 0
            else:
                sign = self.sign_P[start : start + _PAIR_CHUNK].to(device=acts_BL.device, dtype=acts_BP.dtype)
                hit_BP = acts_BP * sign > 0
            both = hit_BP & gt_BF.index_select(1, col).to(acts_BL.device)
            self.tp_P[start : start + lat.numel()] += count_columns(both)


def _candidates(
    W_dec_LE: torch.Tensor, dirs_TE: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent_P, target_P, sign_P): every pair with |cos(W_dec[l], dir_t)| ≥ threshold (chunked over latents),
    and the sign of that cos (±1)."""
    lats, tgts = [], []
    if dirs_TE.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    for start, C_cT in iter_abs_cos(W_dec_LE, dirs_TE):
        l, t = (C_cT >= threshold).nonzero(as_tuple=True)
        lats.append(l.cpu() + start)
        tgts.append(t.cpu())
    lat_P, tgt_P = torch.cat(lats), torch.cat(tgts)
    # |cos| ≥ threshold > 0 here, so the dot product's sign is never a float tie.
    dot_P = (W_dec_LE[lat_P.to(W_dec_LE.device)].double() * dirs_TE[tgt_P.to(dirs_TE.device)].double()).sum(dim=1)
    return lat_P, tgt_P, torch.where(dot_P.cpu() < 0, -1.0, 1.0)


def _recovered(
    latent_P: torch.Tensor,
    target_P: torch.Tensor,
    tp_P: torch.Tensor,
    fired_L: torch.Tensor,
    gt_T: torch.Tensor,
    num_targets: int,
) -> torch.Tensor:
    """recovered_T: some candidate pair of t has F1 = 2 TP / (#fires_l + #fires_t) ≥ F1_THRESHOLD."""
    den = (fired_L[latent_P] + gt_T[target_P]).double()
    f1_P = torch.where(den > 0, 2 * tp_P.double() / den.clamp(min=1), torch.zeros_like(den))
    out = torch.zeros(num_targets, dtype=torch.bool)
    out[target_P[f1_P >= F1_THRESHOLD]] = True
    return out


def _mean_or_none(mask: torch.Tensor) -> float | None:
    return float(mask.double().mean()) if mask.numel() else None


def _positive_int(name: str, value: Any) -> int:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "must be a positive integer"
    )
    return value


@torch.no_grad()
def evaluate_transcoder(
    transcoder: Any,
    world: Any,
    n_samples: int,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> TranscoderResult:
    """Sample `n_samples` (x, y) pairs from `world` in batches and score `transcoder` against its truth.

    `device`: where samples go and metrics run; defaults to (and must equal) the decoder's device.
    `seed`: if given, sampling is reproducible and the world's own stream is left where it was
    (`seeding.seeded_sampling`).
    """
    n_samples = _positive_int("n_samples", n_samples)
    batch_size = _positive_int("batch_size", batch_size)
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), "seed", seed, "must be an int")
    for name in ("encode", "decode"):
        require(
            callable(getattr(transcoder, name, None)),
            name,
            type(transcoder).__name__,
            f"the transcoder must have a callable {name}()",
        )
    E, D = int(world.d_out), int(world.d_in)
    u_FE = world.u_out_FE.detach()
    F_out = int(u_FE.shape[0])
    W_dec_LE = getattr(transcoder, "W_dec_LE", None)
    require(
        isinstance(W_dec_LE, torch.Tensor) and W_dec_LE.ndim == 2 and W_dec_LE.shape[1] == E,
        "W_dec_LE",
        tuple(getattr(W_dec_LE, "shape", ())),
        f"must be a tensor [L, d_out] with d_out = {E}",
    )
    assert isinstance(W_dec_LE, torch.Tensor)
    W_dec_LE = W_dec_LE.detach()
    L = int(W_dec_LE.shape[0])
    W_skip_ED = getattr(transcoder, "W_skip_ED", None)
    if W_skip_ED is not None:
        require(
            isinstance(W_skip_ED, torch.Tensor) and tuple(W_skip_ED.shape) == (E, D),
            "W_skip_ED",
            tuple(getattr(W_skip_ED, "shape", ())),
            f"must be None or a tensor [d_out, d_in] = [{E}, {D}]",
        )
        W_skip_ED = W_skip_ED.detach()
    dev = W_dec_LE.device
    if device is not None:
        try:
            wanted = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError("device", device, f"not a torch device: {err}") from None
        require(
            wanted.type == dev.type and (wanted.index is None or wanted.index == dev.index),
            "device",
            str(device),
            f"the transcoder's decoder is on {dev}; move it there first",
        )

    # Decoder-only parts: matching to the u's, and the candidate pairs for recovery.
    match = match_decoder_to_features(W_dec_LE, u_FE.to(dev), hungarian=True)
    computing_F = world.computing_features().long().cpu()
    merged_NE = world.fanout_merged_direction().to(dev)
    fanout_first_N = world.fanout_pairs()[:, 0].long().cpu()
    comp_lat, comp_tgt, comp_sign = _candidates(W_dec_LE, u_FE.to(dev)[computing_F.to(dev)], COS_THRESHOLD)
    merge_lat, merge_tgt, merge_sign = _candidates(W_dec_LE, merged_NE, COS_THRESHOLD)
    # One pair list; columns index the codes (a merged fanout fires exactly when its first output does).
    pairs = PairFiringCalculator(
        torch.cat([comp_lat, merge_lat]),
        torch.cat([computing_F[comp_tgt], fanout_first_N[merge_tgt]]),
        torch.cat([comp_sign, merge_sign]),
    )

    signs_L = match_signs(W_dec_LE, u_FE.to(dev), match.best_match_L)
    classification = ClassificationCalculator(match.best_match_L, num_features=F_out, sign_L=signs_L)
    truth = TrueFiringCalculator(F_out)
    recon = ReconstructionCalculator(L)
    fired_L = torch.zeros(L, dtype=torch.int64)

    seeded: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if seed is not None:
        cuda = sorted({d.index or 0 for d in (dev, u_FE.device) if d.type == "cuda"})
        seeded = seeded_sampling(world, seed, cuda_devices=cuda)
    with seeded, _EvalMode(transcoder):
        done = 0
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            x_BD, y_BE, _, codes_BF = world.sample_with_features(b)
            if tuple(x_BD.shape) != (b, D) or tuple(y_BE.shape) != (b, E) or tuple(codes_BF.shape) != (b, F_out):
                raise ConfigError(
                    "sample_with_features",
                    (tuple(x_BD.shape), tuple(y_BE.shape), tuple(codes_BF.shape)),
                    f"the world must return x [{b}, {D}], y [{b}, {E}] and codes [{b}, {F_out}]",
                )
            x_BD, y_BE = x_BD.to(dev), y_BE.to(dev)
            gt_BF = _as_dense(codes_BF).to(dev) != 0
            acts = transcoder.encode(x_BD)
            acts_BL = acts.to_dense() if not isinstance(acts, torch.Tensor) or acts.layout != torch.strided else acts
            require(
                acts_BL.ndim == 2 and tuple(acts_BL.shape) == (b, L),
                "encode",
                tuple(acts_BL.shape),
                f"must return codes [{b}, {L}] (L = rows of W_dec_LE)",
            )
            y_hat_BE = transcoder.decode(acts_BL)
            if W_skip_ED is not None:
                y_hat_BE = y_hat_BE + x_BD.to(W_skip_ED.dtype) @ W_skip_ED.T
            recon.update(y_BE, acts_BL, y_hat_BE)
            classification.update(acts_BL, gt_BF)  # signed codes: fires ≠ 0, detects along its match
            truth.update(gt_BF)
            pairs.update(acts_BL, gt_BF)
            fired_L += count_columns(acts_BL != 0)
            done += b

    cls = classification.compute()
    rec = recon.compute()
    tru = truth.compute()
    count_F = tru["firing_count_F"]
    n_comp = int(computing_F.numel())
    tp_comp, tp_merge = pairs.tp_P[: comp_lat.numel()], pairs.tp_P[comp_lat.numel() :]
    recovered_C = _recovered(comp_lat, comp_tgt, tp_comp, fired_L, count_F[computing_F], n_comp)
    merged_N = _recovered(merge_lat, merge_tgt, tp_merge, fired_L, count_F[fanout_first_N], int(fanout_first_N.numel()))
    kinds = world.output_kinds()
    by_kind = {k: _mean_or_none(recovered_C[torch.isin(computing_F, kinds[k].cpu())]) for k in _KIND_KEYS}

    skip_norm = skip_rel = None
    S_ED = world.skip_ED.detach().to(torch.float64).cpu()
    if W_skip_ED is not None:
        S_hat = W_skip_ED.to(torch.float64).cpu()
        skip_norm = float(S_hat.norm())
        S_norm = float(S_ED.norm())
        if S_norm > 0:
            skip_rel = float((S_hat - S_ED).norm()) / S_norm
    fvu = 1.0 - rec["explained_variance"]
    assert match.mcc is not None
    diagnostics = {
        "best_match_L": match.best_match_L,
        "best_cos_L": match.best_cos_L,
        "hungarian_feature_L": match.hungarian_feature_L,
        "hungarian_cos_L": match.hungarian_cos_L,
        "f1_L": cls["f1_L"],
        "precision_L": cls["precision_L"],
        "recall_L": cls["recall_L"],
        "fire_count_L": fired_L,
        "firing_count_F": count_F,
        "computing_F": computing_F,
        "computing_recovered_F": recovered_C,
        "fanout_merged_recovered_N": merged_N,
        "y_total_variance": torch.tensor(recon.ev.total_variance(), dtype=torch.float64),
    }
    result = TranscoderResult(
        f1=cls["f1"],
        precision=cls["precision"],
        recall=cls["recall"],
        accuracy=cls["accuracy"],
        mcc=match.mcc,
        uniqueness=match.uniqueness,
        fvu=fvu,
        skip_rel_error=skip_rel,
        skip_norm=skip_norm,
        computing_features_recovered=_mean_or_none(recovered_C),
        and_recovered=by_kind["and"],
        suppression_recovered=by_kind["suppression"],
        fanout_recovered=by_kind["fanout"],
        fanout_merged_recovered=_mean_or_none(merged_N),
        l0=rec["l0"],
        dead_latents=rec["dead_latents"],
        true_l0=tru["true_l0"],
        mse=rec["mse"],
        n_samples=rec["n_samples"],
        diagnostics=diagnostics,
    )
    for name in ("fvu", "mse"):
        require(
            math.isfinite(getattr(result, name)),
            name,
            getattr(result, name),
            "is not finite: the transcoder's output contains NaN or inf",
        )
    return result
