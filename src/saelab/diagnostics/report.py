"""`saelab diagnose`: every diagnostic for each SAE of a run, a summary row each, plots, one JSON file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError


def default_n_for(l0: float | None, width: int) -> int:
    """n for s_n^dec when diagnosing one SAE: twice its L0 (n must exceed the true L0), at most
    0.45·width (see `l0_select.n_cap`)."""
    from saelab.diagnostics.l0_select import n_cap

    base = 2 * int(math.ceil(l0)) if l0 and l0 > 0 else 32
    return max(1, min(base, n_cap(width)))


def diagnose_sae(
    sae: Any,
    handle: Any,
    n_samples: int = 50_000,
    n: int | None = None,
    parent_cos: float = 0.1,
    top_features: int = 5,
    seed: int = 0,
    eval_samples: int = 4096,
) -> tuple[dict[str, Any], Any]:
    """(summary row, HierarchyDiagnostics or None) for one SAE."""
    from saelab.diagnostics.absorption import hierarchy_diagnostics
    from saelab.diagnostics.l0_sweep import score_sae
    from saelab.diagnostics.projection import decoder_weights

    W = decoder_weights(sae)
    if W.shape[1] != handle.d_in:
        raise ConfigError("sae", f"d_in={W.shape[1]}", f"does not match the data's width {handle.d_in} ({handle.spec})")
    x = handle.eval_batch(eval_samples, seed + 7919).to(W.device)
    width = W.shape[0]
    row: dict[str, Any] = {"d_sae": width, "warnings": []}
    # measured L0 first, so the default n can follow it
    _, cos, l0 = score_sae(sae, x, [1])
    n_used = n if n is not None else default_n_for(l0, width)
    if n_used >= width:
        raise ConfigError("n", n_used, f"must be smaller than the SAE width {width}")
    s_dec, _, _ = score_sae(sae, x, [n_used])
    row.update({"l0": l0, "n": n_used, "s_dec": s_dec[n_used], "decoder_abs_cos": cos})
    diag = None
    model = handle.model
    if model is None:
        row["warnings"].append("no ground truth (plain activations): only s_n^dec and decoder |cos|")
    elif getattr(model, "hierarchy", None) is None:
        row["warnings"].append("the data has no feature hierarchy: absorption is not defined; hedging and recall only")
        diag = _flat_diagnostics(sae, model, n_samples, seed, top_features)
        row.update(diag.summary)
    else:
        diag = hierarchy_diagnostics(
            sae, model, n_samples=n_samples, seed=seed, parent_cos=parent_cos, top_features=top_features
        )
        row.update(diag.summary)
    return row, diag


def _flat_diagnostics(sae: Any, model: Any, n_samples: int, seed: int, top_features: int) -> Any:
    """Hedging and recall for data without a hierarchy (e.g. sbw-toy): a one-parent-free stand-in."""
    from saelab.diagnostics.absorption import HierarchyDiagnostics, hedging_stats, matched_latents
    from saelab.diagnostics.data import sample_model
    from saelab.diagnostics.projection import unit_decoder

    d_unit = unit_decoder(sae)
    feats = model.feature_vectors_FD.float().to(d_unit.device)
    ell_F, ell_cos_F = matched_latents(d_unit, feats, 0.5)
    has = ell_F >= 0
    F = feats.shape[0]
    count_F = torch.zeros(F, dtype=torch.float64)
    hit_F = torch.zeros(F, dtype=torch.float64)
    done, l0_sum = 0, 0.0
    while done < n_samples:
        b = min(2048, n_samples - done)
        hidden, acts = sample_model(model, b, seed + done, with_features=True)
        if hasattr(acts, "to_dense"):
            acts = acts.to_dense()
        fired = (sae.encode(hidden.to(d_unit.device)) > 0).cpu()
        l0_sum += float(fired.sum())
        active = acts.cpu() > 0
        count_F += active.sum(0)
        hit_F += (active & fired[:, ell_F.clamp_min(0)] & has).sum(0)
        done += b
    top = torch.argsort(count_F, descending=True, stable=True)[:top_features]
    hedge = hedging_stats(d_unit, feats, top.to(d_unit.device))
    recall = torch.where(count_F > 0, hit_F / count_F.clamp_min(1), torch.zeros_like(hit_F))
    summary = {
        "n_samples": float(done),
        "l0": l0_sum / done,
        "absorption_rate": math.nan,
        "mean_mixing": float(hedge["mixing"].mean()),
        "mean_max_excess_cos": float(hedge["max_excess"].mean()),
        "mean_excess_cos_top1": float(torch.nanmean(hedge["excess_top"][:, 0])),
        "mean_abs_excess_cos_top1": float(torch.nanmean(hedge["excess_top"][:, 0].abs())),
        "mean_excess_cos_top": float(torch.nanmean(hedge["excess_top"])),
        "features_with_latent": float(has.sum()),
        "recall_weighted": float(hit_F.sum() / count_F.sum()) if count_F.sum() > 0 else math.nan,
    }
    return HierarchyDiagnostics(
        summary=summary,
        parents=torch.zeros(0, dtype=torch.long),
        parent_stats={
            k: torch.zeros(0)
            for k in (
                "n_with_child",
                "n_parent_only",
                "miss_rate",
                "miss_rate_parent_only",
                "absorption_rate",
                "firing_frequency",
            )
        }
        | {"has_latent": torch.zeros(0, dtype=torch.bool)},
        latent_stats=hedge,
        feature_stats={
            "firing_frequency": (count_F / done).float(),
            "recall": recall.float(),
            "matched_latent": ell_F,
            "matched_cos": ell_cos_F,
        },
        top_features=top,
        config={"n_samples": n_samples, "seed": seed, "top_features": top_features, "min_count": 1},
    )


def diagnose_run(
    folders: Sequence[Path],
    data: str,
    out_dir: Path,
    only: Sequence[str] = (),
    n_samples: int = 50_000,
    n: int | None = None,
    parent_cos: float = 0.1,
    top_features: int = 5,
    seed: int = 0,
    device: str = "cpu",
    trust_code: bool = False,
) -> list[dict[str, Any]]:
    """Diagnose each SAE folder (any format `load_pretrained` reads); write `<out_dir>/<name>.png` plots and
    `<out_dir>/diagnostics.json`.

    `trust_code`: import the class a folder's cfg.json names if it is not registered (see `load_sae`)."""
    from saelab.diagnostics.absorption import plot_hierarchy_diagnostics
    from saelab.diagnostics.data import resolve_data
    from saelab.io import write_json_atomic
    from saelab.saes.formats import load_pretrained

    folders = list(folders)
    if only:
        names = {f.name for f in folders}
        unknown = [s for s in only if s not in names]
        if unknown:
            raise ConfigError("sae", unknown, f"not in the run; its SAEs are {', '.join(sorted(names))}")
        folders = [f for f in folders if f.name in set(only)]
    handle = resolve_data(data, device=device)
    out_dir = Path(out_dir)
    results = []
    full = {}
    for folder in folders:
        sae = load_pretrained(folder, device=device, trust_code=trust_code)
        row, diag = diagnose_sae(
            sae, handle, n_samples=n_samples, n=n, parent_cos=parent_cos, top_features=top_features, seed=seed
        )
        row = {"name": folder.name, "sae": str(folder), **row, "out_dir": str(out_dir)}
        if diag is not None:
            png = out_dir / f"{folder.name}.png"
            plot_hierarchy_diagnostics(diag, png, title=f"{folder.name} on {data}")
            row["plot"] = str(png)
            full[folder.name] = diag.to_dict(per_item=True)
        results.append(row)
    write_json_atomic(out_dir / "diagnostics.json", {"data": data, "results": results, "detail": full})
    return results
