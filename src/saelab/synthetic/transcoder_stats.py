"""Statistics of transcoder worlds: true L0 on both sides, computing kinds, where y's variance comes from.

Sampling statistics draw from a forked stream (`seed`), leaving the world's own stream where it
was. Variance fractions use the decomposition y − E y = f + s + ε with f = Σ_j c_j u_j and
s = S x (both centred) and ε the noise:

    feature_var_fraction = tr Cov(f) / tr Cov(y)      skip_var_fraction = tr Cov(s) / tr Cov(y)
    noise_var_fraction   = tr Cov(ε) / tr Cov(y)      cross_var_fraction = 1 − the three above
                                                      (≈ 2 tr Cov(f, s): both depend on a)

input_noise_var_fraction = d_in input_noise_std² / tr Cov(x): the share of the input that is the
dense part ξ (the part that pins S down). tr Cov(·) = Σ_e (E z_e² − (E z_e)²), accumulated in float64. With the true map, skip and bias
a transcoder is left with ε alone, so its fraction of variance unexplained is noise_var_fraction.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saelab.errors import require
from saelab.synthetic.sampling import decode_sparse
from saelab.synthetic.stats import superposition_stats
from saelab.synthetic.transcoder import KIND_NAMES, TranscoderWorld


class _TraceCov:
    """Streaming tr Cov of rows: Σ_e (mean of z_e² − (mean of z_e)²), float64."""

    def __init__(self, dim: int):
        self.sum_E = torch.zeros(dim, dtype=torch.float64)
        self.sq = 0.0
        self.n = 0

    def update(self, z_BE: torch.Tensor) -> None:
        z = z_BE.detach().to(torch.float64)
        self.sum_E += z.sum(0).cpu()
        self.sq += float((z * z).sum())
        self.n += int(z.shape[0])

    def value(self) -> float:
        mean_E = self.sum_E / self.n
        return self.sq / self.n - float((mean_E * mean_E).sum())


@torch.no_grad()
def describe_transcoder_world(
    world: TranscoderWorld, n_samples: int = 100_000, seed: int = 0, batch_size: int = 4096
) -> dict[str, Any]:
    """Everything `saelab synth describe` reports for a transcoder world, as one JSON-ready dict."""
    require(isinstance(n_samples, int) and n_samples >= 1, "n_samples", n_samples, "must be a positive integer")
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "must be a positive integer")
    F, F_out, E = world.num_features, world.num_output_features, world.d_out
    in_count_F = torch.zeros(F, dtype=torch.int64)
    out_count_F = torch.zeros(F_out, dtype=torch.int64)
    l0_in, l0_out, sq_out = 0, 0, 0.0
    tr_y, tr_f, tr_s, tr_e = _TraceCov(E), _TraceCov(E), _TraceCov(E), _TraceCov(E)
    tr_x = _TraceCov(world.d_in)
    zero_E = torch.zeros(E, dtype=world.u_out_FE.dtype, device=world.device)
    supp = world.output_kinds()["suppression"]
    supp_blocked = 0  # owner fired but its suppressor did too
    done = 0
    with world.forked_stream(seed):
        while done < n_samples:
            bs = min(batch_size, n_samples - done)
            x_BD, y_BE, acts, codes = world.sample_sparse(bs)
            in_count_F += torch.bincount(acts.feature_idx.cpu(), minlength=F)
            out_count_F += torch.bincount(codes.feature_idx.cpu(), minlength=F_out)
            l0_in += acts.nnz
            l0_out += codes.nnz
            per = codes.l0_per_sample().to(torch.float64)
            sq_out += float((per * per).sum())
            f_BE = decode_sparse(codes, world.u_out_FE, zero_E)
            s_BE = x_BD.to(world.skip_ED.dtype) @ world.skip_ED.T
            tr_y.update(y_BE)
            tr_x.update(x_BD)
            tr_f.update(f_BE)
            tr_s.update(s_BE)
            tr_e.update(y_BE - f_BE - s_BE - world.bias_out_E)
            done += bs
    n = done
    total = tr_y.value()
    fractions = {
        name: (tr.value() / total if total > 0 else 0.0)
        for name, tr in (("feature", tr_f), ("skip", tr_s), ("noise", tr_e))
    }
    rates_out = out_count_F.double() / n
    kinds = world.output_kinds()
    owner_rates = in_count_F.double()[world.src_out_F] / n
    if supp.numel():
        supp_blocked_rate = (owner_rates[supp] - rates_out[supp]).clamp(min=0)
        supp_blocked = float((supp_blocked_rate / owner_rates[supp].clamp(min=1e-300)).mean())
    per_kind = {}
    for name in KIND_NAMES:
        idx = kinds[name]
        r = rates_out[idx]
        per_kind[name] = {
            "count": int(idx.numel()),
            "firing_rate_min": float(r.min()) if idx.numel() else None,
            "firing_rate_mean": float(r.mean()) if idx.numel() else None,
            "firing_rate_max": float(r.max()) if idx.numel() else None,
        }
    mean_out = l0_out / n
    partners = world.other_out_F[world.other_out_F >= 0]
    return {
        "kind": "transcoder_world",
        "num_features": F,
        "num_output_features": F_out,
        "d_in": world.d_in,
        "d_out": E,
        "seed": world.seed,
        "input_seed": world.input_model.seed,
        "n_samples": n,
        "true_l0": l0_in / n,
        "output_true_l0": mean_out,
        "output_true_l0_stderr": math.sqrt(max(sq_out / n - mean_out * mean_out, 0.0) / n),
        "kinds": per_kind,
        "computing_features": int(world.computing_features().numel()),
        "distinct_partners": int(partners.unique().numel()),
        "suppression_blocked_fraction": supp_blocked if supp.numel() else None,
        "skip_norm": float(world.skip_ED.double().norm()),
        "skip_scale": world.cfg.skip_scale,
        "bias_out_norm": float(world.bias_out_E.double().norm()),
        "noise_std": world.cfg.noise_std,
        "input_noise_std": world.cfg.input_noise_std,
        "input_noise_var_fraction": world.d_in * world.cfg.input_noise_std**2 / tr_x.value()
        if tr_x.value() > 0
        else 0.0,
        "y_total_variance": total,
        "feature_var_fraction": fractions["feature"],
        "skip_var_fraction": fractions["skip"],
        "noise_var_fraction": fractions["noise"],
        "cross_var_fraction": 1.0 - sum(fractions.values()),
        "output_mean_max_abs_cos": superposition_stats(world.u_out_FE)["mean_max_abs_cos"],
        "input_mean_max_abs_cos": superposition_stats(world.input_model.feature_vectors_FD)["mean_max_abs_cos"],
        "build_seconds": world.build_seconds,
    }
