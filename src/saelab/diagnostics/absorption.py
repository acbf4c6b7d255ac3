"""Absorption, hedging and recall against hierarchical ground truth.

Definitions (F true features f_i, unit rows; L latents with unit decoder rows d̂_j; a_i the true
activation of feature i, z_j the latent activation, "fires" = z_j > 0):

* Matched latent of feature i: ℓ(i) = argmax_j cos(d̂_j, f_i), kept if that cos ≥ `min_match_cos`.
* Absorption, per parent p (a feature with children in the hierarchy) and its direct children C(p):
  over samples where p and at least one child are active,

      miss rate       P(ℓ(p) silent | p and a child active)
      absorption rate P(ℓ(p) silent and, for some active child c, ℓ(c) fires and carries the parent
                        direction | p and a child active)

  where ℓ(c) "carries the parent direction" when its excess parent component
  e = d̂_ℓ(c)·f_p − f_c·f_p (the part not explained by the geometry of f_c itself) is ≥ `parent_cos`.
  `miss_rate_parent_only` (ℓ(p) silent | p active, no child active) is the baseline recall failure.
* Hedging, per latent j with best match g(j): excess mixing E_ji = d̂_j·f_i − f_g(j)·f_i for i ≠ g(j),
  i.e. how much of other true features the decoder mixes in beyond what its own feature shares with
  them. Reported: the excess on the `top_features` most frequent features (hedging pulls latents
  toward frequent, correlated features; its sign follows the sign of the correlation, so the
  summary gives both the signed mean and the mean |E|), the largest |E_ji| over all i, and
  mixing = 1 − cos(d̂_j, f_g(j))².
* Recall vs firing frequency, per feature: P(ℓ(i) fires | a_i > 0) against P(a_i > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.diagnostics.data import sample_model
from saelab.diagnostics.projection import decoder_weights, unit_decoder
from saelab.errors import ConfigError, require
from saelab.plotting import FILE_DPI, new_figure, save_figure

_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def matched_latents(
    W_dec_LD: torch.Tensor, feats_FD: torch.Tensor, min_match_cos: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ(i) = argmax_j cos(d̂_j, f_i) (−1 below `min_match_cos`) and that cos, per feature (chunked)."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F, L = f.shape[0], d.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(L, 1))
    best_L = torch.empty(F, dtype=torch.long)
    best_cos = torch.empty(F)
    for s in range(0, F, rows):
        c = f[s : s + rows] @ d.T
        v, i = c.max(dim=1)
        best_cos[s : s + rows] = v.cpu()
        best_L[s : s + rows] = i.cpu()
    best_L = torch.where(best_cos >= min_match_cos, best_L, torch.full_like(best_L, -1))
    return best_L, best_cos


@torch.no_grad()
def best_match_signed(W_dec_LD: torch.Tensor, feats_FD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g(j) = argmax_i |cos(d̂_j, f_i)| and the signed cos, per latent (chunked)."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L, F = d.shape[0], f.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(F, 1))
    g = torch.empty(L, dtype=torch.long)
    c_out = torch.empty(L)
    for s in range(0, L, rows):
        c = d[s : s + rows] @ f.T
        i = c.abs().argmax(dim=1)
        g[s : s + rows] = i.cpu()
        c_out[s : s + rows] = c.gather(1, i.unsqueeze(1)).squeeze(1).cpu()
    return g, c_out


def parent_children(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(parents [P], children [P, C] padded with −1) from the model's hierarchy (direct children)."""
    h = getattr(model, "hierarchy", None)
    if h is None:
        raise ConfigError(
            "data",
            getattr(model, "cfg", type(model).__name__),
            "has no feature hierarchy: absorption needs parent/child ground truth",
        )
    parent_F = h.compiled.parent_F.cpu()
    kids: dict[int, list[int]] = {}
    for child, parent in enumerate(parent_F.tolist()):
        if parent >= 0:
            kids.setdefault(parent, []).append(child)
    if not kids:
        raise ConfigError("hierarchy", "no parents", "has no parent features with children")
    parents = sorted(kids)
    C = max(len(v) for v in kids.values())
    children = torch.full((len(parents), C), -1, dtype=torch.long)
    for k, p in enumerate(parents):
        children[k, : len(kids[p])] = torch.tensor(kids[p])
    return torch.tensor(parents, dtype=torch.long), children


@dataclass
class HierarchyDiagnostics:
    """Per-parent absorption, per-latent hedging, per-feature recall, and their summaries."""

    summary: dict[str, float]
    parents: torch.Tensor  # [P]
    parent_stats: dict[str, torch.Tensor]  # each [P]: n_with_child, n_parent_only, miss_rate, absorption_rate, ...
    latent_stats: dict[str, torch.Tensor]  # each [L]: best_match, best_cos, mixing, max_excess, excess_top [L, K]
    feature_stats: dict[str, torch.Tensor]  # each [F]: firing_frequency, recall, matched_latent, matched_cos
    top_features: torch.Tensor  # [K] most frequent features
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_item: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"summary": self.summary, "config": self.config, "top_features": self.top_features.tolist()}
        if per_item:
            d["parents"] = self.parents.tolist()
            d["parent_stats"] = {k: v.tolist() for k, v in self.parent_stats.items()}
            d["latent_stats"] = {k: v.tolist() for k, v in self.latent_stats.items()}
            d["feature_stats"] = {k: v.tolist() for k, v in self.feature_stats.items()}
        return d


def _encode(sae: Any, x_BD: torch.Tensor) -> torch.Tensor:
    if hasattr(sae, "encode"):
        return sae.encode(x_BD)
    raise ConfigError("sae", type(sae).__name__, "has no encode(): cannot measure which latents fire")


@torch.no_grad()
def hedging_stats(sae_or_W: Any, feats_FD: torch.Tensor, top_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-latent decoder mixing (weights only): see the module docstring."""
    W = sae_or_W if isinstance(sae_or_W, torch.Tensor) else decoder_weights(sae_or_W)
    d = W.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g, cos_g = best_match_signed(d, f)
    sign = torch.where(cos_g < 0, -1.0, 1.0)
    L, F = d.shape[0], f.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(F, 1))
    max_excess = torch.empty(L)
    max_excess_feature = torch.empty(L, dtype=torch.long)
    top = top_features.to(d.device)
    excess_top = torch.empty(L, top.numel())
    for s in range(0, L, rows):
        gi = g[s : s + rows].to(d.device)
        sg = sign[s : s + rows].to(d.device).unsqueeze(1)
        # a latent that matched −f_g is read with its sign flipped, so "mixing in +f_i" is positive
        excess = sg * (d[s : s + rows] @ f.T) - f[gi] @ f.T
        excess[torch.arange(gi.numel(), device=d.device), gi] = 0.0
        v, i = excess.abs().max(dim=1)
        max_excess[s : s + rows] = v.cpu()
        max_excess_feature[s : s + rows] = i.cpu()
        e_top = excess[:, top]
        e_top[gi.unsqueeze(1) == top.unsqueeze(0)] = float("nan")  # a latent matched to that feature
        excess_top[s : s + rows] = e_top.cpu()
    return {
        "best_match": g,
        "best_cos": cos_g.abs(),
        "mixing": 1.0 - cos_g**2,
        "max_excess": max_excess,
        "max_excess_feature": max_excess_feature,
        "excess_top": excess_top,
    }


@torch.no_grad()
def hierarchy_diagnostics(
    sae: Any,
    model: Any,
    n_samples: int = 50_000,
    batch_size: int = 2048,
    seed: int = 0,
    parent_cos: float = 0.1,
    min_match_cos: float = 0.5,
    top_features: int = 5,
    min_count: int = 20,
) -> HierarchyDiagnostics:
    """Absorption per parent, hedging per latent, recall per feature for `sae` on `model`."""
    for name, v in (("n_samples", n_samples), ("batch_size", batch_size), ("top_features", top_features)):
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
    require(-1 <= parent_cos <= 1, "parent_cos", parent_cos, "must be in [-1, 1]")
    W = decoder_weights(sae)
    feats_FD = model.feature_vectors_FD.detach()
    F, D = feats_FD.shape
    if W.shape[1] != D:
        raise ConfigError(
            "sae",
            f"d_in={W.shape[1]}",
            f"does not match the data's width hidden_dim={D}; SAE and data must have the same width",
        )
    dev = W.device
    feats = feats_FD.float().to(dev)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_unit = unit_decoder(sae).to(dev)
    ell_F, ell_cos_F = matched_latents(d_unit, feats, min_match_cos)
    has_latent_F = ell_F >= 0
    ell_safe_F = ell_F.clamp_min(0).to(dev)

    parents, children = parent_children(model)
    P, C = children.shape
    child_valid = children >= 0
    child_safe = children.clamp_min(0)
    # excess parent component of each child's latent (weights only)
    d_child = d_unit[ell_safe_F[child_safe.reshape(-1)]].reshape(P, C, -1)
    f_par = feats[parents.to(dev)]
    f_child = feats[child_safe.reshape(-1).to(dev)].reshape(P, C, -1)
    excess_pc = (d_child * f_par.unsqueeze(1)).sum(-1) - (f_child * f_par.unsqueeze(1)).sum(-1)
    absorbing_pc = (
        child_valid.to(dev)
        & has_latent_F[child_safe].to(dev)
        & (excess_pc >= parent_cos)
        & (ell_safe_F[child_safe].to(dev) != ell_safe_F[parents].to(dev).unsqueeze(1))
    )

    count_F = torch.zeros(F, dtype=torch.float64, device=dev)
    hit_F = torch.zeros(F, dtype=torch.float64, device=dev)
    n_with_child = torch.zeros(P, dtype=torch.float64, device=dev)
    n_parent_only = torch.zeros(P, dtype=torch.float64, device=dev)
    miss_with_child = torch.zeros(P, dtype=torch.float64, device=dev)
    miss_parent_only = torch.zeros(P, dtype=torch.float64, device=dev)
    absorbed = torch.zeros(P, dtype=torch.float64, device=dev)
    fired_any_L = torch.zeros(W.shape[0], dtype=torch.bool, device=dev)
    l0_sum = 0.0
    training = getattr(sae, "training", False)
    if hasattr(sae, "eval"):
        sae.eval()
    done = 0
    try:
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            hidden_BD, acts_BF = sample_model(model, b, seed + done, with_features=True)
            if hasattr(acts_BF, "to_dense"):
                acts_BF = acts_BF.to_dense()
            hidden_BD, acts_BF = hidden_BD.to(dev), acts_BF.to(dev)
            fired_BL = _encode(sae, hidden_BD) > 0
            fired_any_L |= fired_BL.any(0)
            l0_sum += float(fired_BL.sum())
            active_BF = acts_BF > 0
            count_F += active_BF.sum(0)
            own_fired_BF = fired_BL[:, ell_safe_F] & has_latent_F.to(dev)
            hit_F += (active_BF & own_fired_BF).sum(0)
            p_act = active_BF[:, parents.to(dev)]
            c_act = active_BF[:, child_safe.reshape(-1).to(dev)].reshape(b, P, C) & child_valid.to(dev)
            any_child = c_act.any(-1)
            p_silent = ~own_fired_BF[:, parents.to(dev)]
            c_fired = own_fired_BF[:, child_safe.reshape(-1).to(dev)].reshape(b, P, C)
            absorbing_event = (c_act & c_fired & absorbing_pc.unsqueeze(0)).any(-1)
            with_child = p_act & any_child
            only = p_act & ~any_child
            n_with_child += with_child.sum(0)
            n_parent_only += only.sum(0)
            miss_with_child += (with_child & p_silent).sum(0)
            miss_parent_only += (only & p_silent).sum(0)
            absorbed += (with_child & p_silent & absorbing_event).sum(0)
            done += b
    finally:
        if training and hasattr(sae, "train"):
            sae.train()

    def rate(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))

    parent_has_latent = has_latent_F[parents].to(dev)
    miss_rate = rate(miss_with_child, n_with_child)
    absorption_rate = rate(absorbed, n_with_child)
    miss_rate_only = rate(miss_parent_only, n_parent_only)
    freq_F = (count_F / done).cpu()
    recall_F = rate(hit_F, count_F).cpu()
    recall_F[~has_latent_F] = 0.0
    # most frequent by measured firing frequency (configured probabilities of hierarchy children are
    # conditional on their parent, not marginal)
    top = torch.argsort(freq_F, descending=True, stable=True)[:top_features]
    hedge = hedging_stats(d_unit, feats, top.to(dev))

    usable = (n_with_child >= min_count) & parent_has_latent
    w = n_with_child * usable
    summary: dict[str, float] = {
        "n_samples": float(done),
        "l0": l0_sum / done,
        "dead_latents": float((~fired_any_L).sum()),
        "parents": float(P),
        "parents_with_latent": float(parent_has_latent.sum()),
        "parents_scored": float(usable.sum()),
        "absorption_rate": float((absorbed * usable).sum() / w.sum()) if w.sum() > 0 else math.nan,
        "absorption_rate_mean_over_parents": float(absorption_rate[usable].mean()) if usable.any() else math.nan,
        "parent_miss_rate_with_child": float((miss_with_child * usable).sum() / w.sum()) if w.sum() > 0 else math.nan,
        "parent_miss_rate_parent_only": _weighted(miss_parent_only, n_parent_only, usable),
        "absorbing_child_latents": float(absorbing_pc.sum()),
        "mean_mixing": float(hedge["mixing"].mean()),
        "mean_max_excess_cos": float(hedge["max_excess"].mean()),
        "mean_excess_cos_top1": float(torch.nanmean(hedge["excess_top"][:, 0])) if top.numel() else math.nan,
        "mean_abs_excess_cos_top1": float(torch.nanmean(hedge["excess_top"][:, 0].abs())) if top.numel() else math.nan,
        "mean_excess_cos_top": float(torch.nanmean(hedge["excess_top"])) if top.numel() else math.nan,
        "features_with_latent": float(has_latent_F.sum()),
        "recall_weighted": float((hit_F.sum() / count_F.sum()).cpu()) if count_F.sum() > 0 else math.nan,
    }
    return HierarchyDiagnostics(
        summary=summary,
        parents=parents,
        parent_stats={
            "n_with_child": n_with_child.cpu(),
            "n_parent_only": n_parent_only.cpu(),
            "miss_rate": miss_rate.cpu(),
            "miss_rate_parent_only": miss_rate_only.cpu(),
            "absorption_rate": absorption_rate.cpu(),
            "has_latent": parent_has_latent.cpu(),
            "firing_frequency": freq_F[parents],
        },
        latent_stats=hedge | {"fired": fired_any_L.cpu()},
        feature_stats={
            "firing_frequency": freq_F,
            "recall": recall_F,
            "matched_latent": ell_F,
            "matched_cos": ell_cos_F,
        },
        top_features=top,
        config={
            "n_samples": n_samples,
            "seed": seed,
            "parent_cos": parent_cos,
            "min_match_cos": min_match_cos,
            "top_features": top_features,
            "min_count": min_count,
        },
    )


def _plot_absorption(ax: Any, ps: dict[str, torch.Tensor], ok: torch.Tensor, rate: float) -> None:
    ax.scatter(
        ps["firing_frequency"][ok], ps["miss_rate"][ok], s=10, alpha=0.6, label="parent latent silent (child active)"
    )
    ax.scatter(
        ps["firing_frequency"][ok],
        ps["absorption_rate"][ok],
        s=10,
        alpha=0.6,
        label="absorbed (silent, child latent carries parent)",
    )
    ax.scatter(
        ps["firing_frequency"][ok],
        ps["miss_rate_parent_only"][ok],
        s=10,
        alpha=0.4,
        marker="x",
        label="parent latent silent (parent only)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("parent firing frequency (fraction of inputs, log scale)")
    ax.set_ylabel("rate (fraction of inputs)")
    ax.set_title(f"Absorption per parent (rate {rate:.3f})")
    ax.legend(fontsize=7)


def _weighted(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> float:
    d = float((den * mask).sum())
    return float((num * mask).sum()) / d if d > 0 else math.nan


def plot_hierarchy_diagnostics(diag: HierarchyDiagnostics, path: str | Path, title: str = "") -> Path:
    """Three panels: absorption per parent vs its firing frequency, hedging on the most frequent
    features, recall vs firing frequency."""
    fig = new_figure(16, 4.4, dpi=FILE_DPI)
    axes = fig.subplots(1, 3)
    ps = diag.parent_stats
    ok = (ps["n_with_child"] >= diag.config.get("min_count", 1)) & ps["has_latent"]
    ax = axes[0]
    if not bool(ok.any()):
        ax.text(
            0.5,
            0.5,
            "no parent features with a latent\n(no hierarchy, or too few samples)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("Absorption per parent")
        ax.set_xlabel("parent firing frequency (fraction of inputs)")
        ax.set_ylabel("rate (fraction of inputs)")
    else:
        _plot_absorption(ax, ps, ok, diag.summary["absorption_rate"])
    ax = axes[1]
    et = diag.latent_stats["excess_top"]
    top = diag.top_features.tolist()
    data = [et[:, k][~torch.isnan(et[:, k])].numpy() for k in range(len(top))]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(top) + 1), [f"f{i}" for i in top])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("true feature (most frequent first)")
    ax.set_ylabel("excess cos of other latents' decoders (unitless)")
    ax.set_title(f"Hedging: mixing in frequent features (mean {diag.summary['mean_excess_cos_top']:+.4f})")
    ax = axes[2]
    fs = diag.feature_stats
    freq, rec = fs["firing_frequency"], fs["recall"]
    seen = freq > 0
    ax.scatter(freq[seen], rec[seen], s=4, alpha=0.3, label="feature")
    if seen.any():
        lf = torch.log10(freq[seen])
        edges = torch.linspace(float(lf.min()), float(lf.max()) + 1e-9, 13)
        centers, means = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            m = (lf >= a) & (lf < b)
            if m.sum() >= 3:
                centers.append(float(10 ** ((a + b) / 2)))
                means.append(float(rec[seen][m].mean()))
        ax.plot(centers, means, color="black", marker="o", label="binned mean")
    if seen.any():
        ax.set_xscale("log")
    ax.set_xlabel("true firing frequency (fraction of inputs, log scale)")
    ax.set_ylabel("recall of its matched latent (0–1)")
    ax.set_title(f"Recall vs firing frequency (weighted {diag.summary['recall_weighted']:.3f})")
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
