"""The report's figures: matplotlib (`saelab.plotting`: Agg canvas, no pyplot state) rendered to PNG bytes.

Every figure has a title, labelled axes with units and a legend; sizes are chosen so that a figure is legible at
the report's 1,100-pixel content width (a laptop screen) without zooming.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from saelab.metrics.names import METRICS
from saelab.plotting import figure_png_bytes, new_figure
from saelab.training.trainer import SILENT_WINDOW_SAMPLES

DEPTH_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
NO_DEPTH_COLOUR = "#9e9e9e"


def _arch_colours(archs: Sequence[str]) -> dict[str, str]:
    return {a: f"C{i % 10}" for i, a in enumerate(sorted(set(archs)))}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------- trade-off
def tradeoff_figure(entries: Sequence[Any]) -> bytes:
    """F1, MCC, precision, recall against target L0 (one line per architecture, mean ± sd over seeds), and
    precision against recall with each point labelled by its L0: the trade-off L0 mediates."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e.arch, e.l0_target), []).append(e.metrics)
    colours = _arch_colours([a for a, _ in groups])
    fig = new_figure(11.5, 6.6)
    axes = fig.subplots(2, 3)
    # what each score averages, beside its name
    panels = [
        ("f1", "mean over latents"),
        ("mcc", "Hungarian |cos|"),
        ("precision", "mean over latents"),
        ("recall", "mean over latents"),
    ]
    for ax, (key, averaged) in zip(axes.flat, panels):
        spec = METRICS[key]
        for arch in sorted(colours):
            pts = []
            for (a, l0), ms in groups.items():
                vals = [float(m[key]) for m in ms if m.get(key) is not None]
                if a == arch and vals:
                    pts.append((l0, *_mean_sd(vals)))
            if not pts:
                continue
            pts.sort()
            x, y, err = zip(*pts)
            ax.errorbar(x, y, yerr=err, fmt="-o", color=colours[arch], capsize=3, label=arch)
        ax.set_title(f"{spec.name} vs L0")
        ax.set_xlabel("target L0 (active latents per input)")
        ax.set_ylabel(f"{spec.name} ({averaged}) ({spec.unit})")
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    for (arch, l0), ms in sorted(groups.items()):
        p = [float(m["precision"]) for m in ms if m.get("precision") is not None]
        r = [float(m["recall"]) for m in ms if m.get("recall") is not None]
        if p and r:
            px, rx = statistics.fmean(p), statistics.fmean(r)
            ax.scatter(rx, px, color=colours[arch], s=36, zorder=3)
            ax.annotate(f"L0 {l0:g}", (rx, px), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # lines through each architecture's points in L0 order show the direction L0 moves them
    for arch in colours:
        pts = sorted(
            (
                l0,
                statistics.fmean([float(m["recall"]) for m in ms]),
                statistics.fmean([float(m["precision"]) for m in ms]),
            )
            for (a, l0), ms in groups.items()
            if a == arch and all(m.get("precision") is not None and m.get("recall") is not None for m in ms)
        )
        if len(pts) > 1:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], color=colours[arch], alpha=0.6)
    ax.set_title("Precision vs recall (labels: target L0)")
    ax.set_xlabel("recall (0–1)")
    ax.set_ylabel("precision (0–1)")
    ax.grid(alpha=0.3)
    legend_ax = axes[1, 2]
    legend_ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        legend_ax.legend(handles, labels, title="architecture", loc="center", frameon=False)
    fig.suptitle("Ground-truth scores against L0 (mean ± sd over seeds)")
    fig.tight_layout()
    return figure_png_bytes(fig)


# ----------------------------------------------------------------------------------------- per feature
def recall_frequency_figure(panels: Sequence[tuple[str, Any, torch.Tensor | None]]) -> bytes:
    """Per true feature: recall of its matched latent against its firing frequency, coloured by hierarchy depth.

    panels: (title, HierarchyDiagnostics, level_F or None)."""
    n = len(panels)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    # legend in a column of its own on the right, so neither it nor the title is ever clipped
    fig = new_figure(11.5 if cols > 1 else 8.5, 4.2 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    legend_items: dict[str, Any] = {}
    for ax, (title, diag, level_F) in zip(axes.flat, panels):
        fs = diag.feature_stats
        freq, rec = fs["firing_frequency"].float(), fs["recall"].float()
        seen = freq > 0
        levels = level_F.cpu() if level_F is not None else torch.full_like(freq, -1, dtype=torch.long)
        for depth in sorted(set(levels[seen].tolist())):
            m = seen & (levels == depth)
            label = "not in a hierarchy" if depth < 0 else (f"depth {depth} (root)" if depth == 0 else f"depth {depth}")
            colour = NO_DEPTH_COLOUR if depth < 0 else DEPTH_COLOURS[depth % len(DEPTH_COLOURS)]
            h = ax.scatter(freq[m], rec[m], s=7, alpha=0.55, color=colour, label=label, linewidths=0)
            legend_items.setdefault(label, h)
        if bool(seen.any()):
            lf = torch.log10(freq[seen])
            edges = torch.linspace(float(lf.min()), float(lf.max()) + 1e-9, 11)
            cx, cy = [], []
            for a, b in zip(edges[:-1], edges[1:]):
                m = (lf >= a) & (lf < b)
                if int(m.sum()) >= 3:
                    cx.append(float(10 ** ((a + b) / 2)))
                    cy.append(float(rec[seen][m].mean()))
            h = ax.plot(cx, cy, color="black", marker="o", markersize=4, label="binned mean")[0]
            legend_items.setdefault("binned mean", h)
            ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("true firing frequency (fraction of inputs, log scale)")
        ax.set_ylabel("recall of matched latent (0–1)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    order = sorted(legend_items, key=lambda s: (s == "binned mean", s == "not in a hierarchy", s))
    right = 0.84 if cols > 1 else 0.75
    fig.legend(
        [legend_items[k] for k in order],
        order,
        loc="center left",
        bbox_to_anchor=(right, 0.5),
        frameon=False,
        markerscale=2.0,
        title="true feature",
    )
    fig.suptitle("Recall per true feature vs firing frequency (colour: depth in the hierarchy)")
    fig.tight_layout(rect=(0, 0, right, 1))
    return figure_png_bytes(fig)


# ----------------------------------------------------------------------------------------- dictionary
def best_cos_figure(per_sae: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]]) -> bytes:
    """Left: each latent's best |cos| with any true feature, sorted (one curve per SAE). Right: the histogram
    for the first SAE, live and dead latents stacked. per_sae: (name, best_cos_L, fired_L or None)."""
    fig = new_figure(11.5, 4.2)
    ax, ax2 = fig.subplots(1, 2)
    for i, (name, best, _) in enumerate(per_sae):
        v = best.float().sort(descending=True).values
        ax.plot(torch.linspace(0, 1, v.numel()), v, color=f"C{i % 10}", label=name)
    ax.set_title("Best |cos| of each latent with a true feature")
    ax.set_xlabel("latent rank (fraction of the dictionary, best first)")
    ax.set_ylabel("max |cos| over true features (0–1)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    name, best, fired = per_sae[0]
    bins = torch.linspace(0, 1, 41).tolist()
    if fired is not None:
        ax2.hist(
            [best[fired].float().numpy(), best[~fired].float().numpy()],
            bins=bins,
            stacked=True,
            color=["C0", "C3"],
            label=[f"live latents ({int(fired.sum())})", f"dead latents ({int((~fired).sum())})"],
        )
    else:
        ax2.hist(best.float().numpy(), bins=bins, color="C0", label="latents")
    ax2.set_title(f"Distribution for {name}")
    ax2.set_xlabel("max |cos| over true features (0–1)")
    ax2.set_ylabel("number of latents")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png_bytes(fig)


def similarity_heatmap_figure(
    name: str,
    W_dec_LD: torch.Tensor,
    feats_FD: torch.Tensor,
    n_latents: int = 40,
    seed: int = 0,
    live_L: torch.Tensor | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """|cos| between a random sample of latents (rows, ordered by their best-matching true feature) and those
    matched features (columns, same order): a clean dictionary shows a sharp diagonal."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f = feats_FD.float().to(d.device)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    pool = torch.arange(d.shape[0])
    if live_L is not None and int(live_L.sum()) >= 2:
        pool = pool[live_L.cpu()]
    g = torch.Generator().manual_seed(seed)
    sample = pool[torch.randperm(pool.numel(), generator=g)[: min(n_latents, pool.numel())]]
    C_sF = (d[sample] @ f.T).abs()
    match = C_sF.argmax(dim=1).cpu()
    order = torch.argsort(match * d.shape[0] + sample, stable=True)
    sample, match = sample[order], match[order]
    cols = list(dict.fromkeys(match.tolist()))  # matched features, in row order, each once
    M = (d[sample] @ f[cols].T).abs().cpu()
    fig = new_figure(11.5, 6.0)
    ax = fig.subplots(1, 1)
    im = ax.imshow(M.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("|cos(decoder row, true feature)| (0–1)")
    ax.set_yticks(range(len(sample)), [f"latent {int(i)}" for i in sample], fontsize=6)
    ax.set_xticks(range(len(cols)), [f"f{c}" for c in cols], fontsize=6, rotation=90)
    ax.set_xlabel("true feature (the rows' best matches, same order)")
    ax.set_ylabel(f"SAE latent (random sample of {len(sample)}, ordered by matched feature)")
    ax.set_title(f"{name}: decoder vs true features (|cos|; a sharp diagonal = one latent per feature)")
    fig.tight_layout()
    shared = len(sample) - len(cols)
    return figure_png_bytes(fig), {
        "latents": len(sample),
        "features": len(cols),
        "shared": shared,
        "diag_mean": float(M[torch.arange(len(sample)), [cols.index(int(m)) for m in match]].mean()),
    }


# ----------------------------------------------------------------------------------------- training
# (history key, panel title, y label, log scale). The trainer logs training-batch figures: a TopK-family SAE's L0
# there is k by construction, and AuxK's dead count stays 0 until a run passes its dead window, so each panel says
# what it plots, and the final evaluation's values (inference SAE, fresh samples) are drawn beside the curves.
HISTORY_PANELS = [
    ("loss", "Training loss", "training loss (log scale)", True),
    ("l0", "L0 on training batches", METRICS["l0"].axis_label, False),
    ("explained_variance", "Explained variance on training batches", METRICS["explained_variance"].axis_label, False),
    ("dead_latents", "Dead latents during training", "latents (count)", False),
]
FINAL_MARKER = {"marker": "D", "s": 46, "edgecolors": "black", "linewidths": 0.8, "zorder": 4}


def history_figure(
    history: Sequence[dict[str, Any]],
    names: Sequence[str],
    finals: dict[str, dict[str, Any]] | None = None,
    dead_window: int | None = None,
) -> bytes | None:
    """`training_curves_figure` as PNG bytes (None without a training history)."""
    fig = training_curves_figure(history, names, finals, dead_window)
    return None if fig is None else figure_png_bytes(fig)


def training_curves_figure(
    history: Sequence[dict[str, Any]],
    names: Sequence[str],
    finals: dict[str, dict[str, Any]] | None = None,
    dead_window: int | None = None,
) -> Any:
    """Loss, L0, explained variance and dead latents against the training step, one colour per SAE.

    `finals[name]`: the SAE's final evaluation (l0, explained_variance, dead_latents, n_samples), drawn as a
    diamond at the last step. The dead panel plots `silent_latents` (no firing in the last 100k training samples:
    the estimate of the final "dead", never firing on the evaluation samples) solid, and AuxK's `dead_latents`
    (silent for more than `dead_window` steps) dashed."""
    rows = [h for h in history if "step" in h and "eval" not in h]
    if not rows:
        return None
    finals = finals or {}

    def has(key: str) -> bool:
        keys = (key, "silent_latents") if key == "dead_latents" else (key,)
        return any(_logged(rows, n, k) for n in names for k in keys)

    present = [p for p in HISTORY_PANELS if has(p[0])]
    if not present:
        return None
    last_step = max(h["step"] for h in rows)
    fig = new_figure(11.5, 7.0)
    axes = fig.subplots(2, 2)
    eval_samples = sorted({int(f["n_samples"]) for f in finals.values() if _is_number(f.get("n_samples"))})
    on_eval = f" on {eval_samples[0]:,} samples" if len(eval_samples) == 1 else ""
    style_handles: dict[str, Any] = {}
    for ax, (key, title, label, log) in zip(axes.flat, present):
        for i, name in enumerate(names):
            colour = f"C{i % 10}"
            main_key = "silent_latents" if key == "dead_latents" and _logged(rows, name, "silent_latents") else key
            pts = _points(rows, name, main_key)
            if pts:  # a marker on each point of a short run (a line through one point shows nothing)
                ax.plot(*zip(*pts), color=colour, label=name, lw=1.3, marker="o" if len(pts) < 8 else None, ms=3)
            if main_key == "silent_latents":
                auxk = _points(rows, name, "dead_latents")
                if auxk:
                    h = ax.plot(*zip(*auxk), color=colour, lw=1.0, ls="--", alpha=0.8)[0]
                    window = f" > {dead_window:,} steps" if dead_window else ""
                    style_handles.setdefault(f"dashed: AuxK dead (silent{window})", h)
            final = finals.get(name, {}).get(key)
            if key != "loss" and isinstance(final, (int, float)) and _is_number(final):
                h = ax.scatter([last_step], [float(final)], color=colour, **FINAL_MARKER)
                style_handles.setdefault(f"final evaluation (inference SAE{on_eval})", h)
        if key == "dead_latents" and any(_logged(rows, n, "silent_latents") for n in names):
            title = "Silent and dead latents during training"
            style_handles.setdefault(
                f"solid: silent on the last {SILENT_WINDOW_SAMPLES // 1000}k training samples or half the run "
                "(estimates the final dead)",
                ax.plot([], [], color="grey", lw=1.3)[0],
            )
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (batches)")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    # Legends below the panels, never over the curves: SAEs (colours), then what the line styles and markers mean.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles += list(style_handles.values())
    labels += list(style_handles)
    ncol = min(4 if max(len(t) for t in labels) < 40 else 2, max(1, len(labels)))  # long labels: 2 columns fit
    n_rows = math.ceil(len(labels) / ncol)
    bottom = min(0.35, 0.03 + 0.035 * n_rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _logged(rows: Sequence[dict[str, Any]], name: str, key: str) -> bool:
    return any(h.get(f"{name}/{key}") is not None for h in rows)


def _points(rows: Sequence[dict[str, Any]], name: str, key: str) -> list[tuple[float, float]]:
    return [(h["step"], h[f"{name}/{key}"]) for h in rows if _is_number(h.get(f"{name}/{key}"))]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------- geometry
@torch.no_grad()
def max_cos_to_other_latents(W_dec_LD: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per latent: the largest |cos| between its decoder row and any other latent's (chunked)."""
    d = W_dec_LD.float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    L = d.shape[0]
    out = torch.empty(L)
    for s in range(0, L, chunk):
        c = (d[s : s + chunk] @ d.T).abs_()
        rows = torch.arange(c.shape[0])
        c[rows, rows + s] = 0.0
        out[s : s + chunk] = c.max(dim=1).values.cpu()
    return out


def decoder_geometry_figure(per_sae: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """Histogram of each latent's max |cos| with another latent: near-duplicate latents pile up near 1."""
    fig = new_figure(11.5, 3.8)
    ax = fig.subplots(1, 1)
    bins = torch.linspace(0, 1, 51).tolist()
    for i, (name, mx) in enumerate(per_sae):
        ax.hist(
            mx.numpy(),
            bins=bins,
            histtype="step",
            lw=1.6,
            color=f"C{i % 10}",
            label=f"{name} (median {float(mx.median()):.2f})",
            density=True,
        )
    ax.set_title("Decoder self-similarity: each latent's largest |cos| with another latent (no ground truth needed)")
    ax.set_xlabel("max |cos| with another decoder row (0–1)")
    ax.set_ylabel("density (fraction of latents per unit |cos|)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png_bytes(fig)
