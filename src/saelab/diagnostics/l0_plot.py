"""The L0 sweep's figure: both proxy metrics (and ground truth when known) against L0."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.metrics.names import METRICS
from saelab.plotting import FILE_DPI, new_figure, save_figure

if TYPE_CHECKING:
    from saelab.diagnostics.l0_sweep import L0SweepResult

L0_AXIS_LABEL = "SAE L0 (target active latents per input)"


def l0_sweep_figure(sweep: L0SweepResult) -> Any:
    """Both metrics against L0, with the recommendation (and true L0 when known) marked."""
    import matplotlib

    rec = sweep.recommendation
    l0s = [p.l0_target for p in sweep.points]
    has_gt = any("mcc" in p.ground_truth for p in sweep.points)
    ncols = 3 if has_gt else 2
    fig = new_figure(5.2 * ncols, 5.2, dpi=FILE_DPI)  # room below the panels for their legends
    axes = fig.subplots(1, ncols)
    ax = axes[0]
    cmap = matplotlib.colormaps["viridis"]
    for j, n in enumerate(rec.ns):
        ax.plot(
            l0s, [p.s_dec[n] for p in sweep.points], marker=".", color=cmap(j / max(1, len(rec.ns) - 1)), label=f"n={n}"
        )
    ax.set_title("n-th decoder projection $s_n^{dec}$")
    ax.set_xlabel(L0_AXIS_LABEL)
    ax.set_ylabel("$s_n^{dec}$ (projection, input units)")
    ax2 = axes[1]
    ax2.plot(l0s, [p.decoder_abs_cos for p in sweep.points], marker="o", color="tab:red", label="decoder mean |cos|")
    ax2.set_title("Mean pairwise |cos| of decoder rows")
    ax2.set_xlabel(L0_AXIS_LABEL)
    ax2.set_ylabel("mean |cos| (unitless)")
    ax2b = ax2.twinx()
    ax2b.plot(l0s, rec.combined_score, marker="s", color="tab:blue", alpha=0.6, label="combined $s_n^{dec}$ score")
    ax2b.set_ylabel("combined normalised $s_n^{dec}$ (0 = valley)")
    if has_gt:
        ax3 = axes[2]
        for key in ("mcc", "f1"):
            ax3.plot(l0s, [p.ground_truth.get(key) for p in sweep.points], marker="o", label=METRICS[key].label)
        ax3.set_title("Ground truth (synthetic data)")
        ax3.set_xlabel(L0_AXIS_LABEL)
        ax3.set_ylabel("score (0–1)")
    for a in axes:
        a.axvline(rec.recommended_l0, color="black", linestyle="--", label=f"recommended L0 = {rec.recommended_l0:g}")
        if sweep.true_l0_first_width is not None:
            a.axvline(
                sweep.true_l0_first_width,
                color="tab:green",
                linestyle=":",
                label=f"true L0 (first {sweep.width} features) = {sweep.true_l0_first_width:.1f}",
            )
        a.grid(alpha=0.3)
    # Legends under their panels, never over the curves (the curves fill the whole plotting area).
    below = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "frameon": False}
    axes[0].legend(ncol=2, **below)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, **below)
    if has_gt:
        axes[2].legend(**below)
    fig.suptitle(f"L0 sweep: {sweep.arch} width {sweep.width} on {sweep.data}")
    fig.tight_layout()
    return fig


def plot_l0_sweep(sweep: L0SweepResult, path: str | Path) -> Path:
    """Write `l0_sweep_figure` as a PNG at `path` (atomically)."""
    return save_figure(l0_sweep_figure(sweep), path)
