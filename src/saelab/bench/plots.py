"""The F1/MCC against L0 figure of `saelab results plot`, drawn on its own Agg canvas (no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError


def plot_f1_vs_l0(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """PNG with F1 vs L0 and MCC vs L0 from leaderboard rows: one line per architecture (and budget, when a run
    used another than its protocol's) with ±sd error bars; published reference rows as hollow markers."""
    from saelab.bench.export import format_budget
    from saelab.bench.paths import check_output_file
    from saelab.plotting import new_figure, save_figure

    check_output_file(path)  # before the figure is drawn
    rows = [r for r in rows if r.get("f1_mean") is not None or r.get("mcc_mean") is not None]
    if not rows:
        raise ConfigError("rows", 0, "nothing to plot: no leaderboard rows with F1 or MCC")
    archs = sorted({r["arch"] for r in rows})
    colours = {arch: f"C{i % 10}" for i, arch in enumerate(archs)}
    several_protocols = len({r["protocol"] for r in rows}) > 1
    series: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        # A non-protocol budget is its own line, never joined to the protocol's points.
        budget = "" if r.get("protocol_budget") in (None, True) else format_budget(r.get("samples"))
        series.setdefault((r["arch"], r.get("source", "saelab"), r["protocol"], budget), []).append(r)

    fig = new_figure(12, 4.8, dpi=110)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("f1", "mcc"), ("F1 (mean over latents)", "MCC")):
        # saelab's line first, then the published markers of the same architecture
        for (arch, source, protocol, budget), group in sorted(
            series.items(), key=lambda kv: (kv[0][0], kv[0][1] != "saelab", kv[0][2], kv[0][3])
        ):
            points = sorted(
                (float(r["l0_target"]), float(r[f"{metric}_mean"]), float(r.get(f"{metric}_sd") or 0.0))
                for r in group
                if r.get(f"{metric}_mean") is not None
            )
            if not points:
                continue
            x, y, err = zip(*points)
            name = arch + (f" [{protocol}]" if several_protocols else "") + (f" @ {budget}" if budget else "")
            if source == "published":
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt="o",
                    linestyle="none",
                    markerfacecolor="none",
                    markersize=8,
                    markeredgewidth=1.5,
                    color=colours[arch],
                    capsize=3,
                    label=f"{name} (published)",
                )
            else:
                ax.errorbar(x, y, yerr=err, fmt="--o" if budget else "-o", color=colours[arch], capsize=3, label=name)
        ax.set_xlabel("target L0")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' ')[0]} vs L0")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    more_h, more_l = axes[1].get_legend_handles_labels()
    for h, lab in zip(more_h, more_l):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "SAE quality vs L0 (mean ± sd over seeds; hollow markers = published reference)")
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    try:
        save_figure(fig, path)
    except OSError as err:
        raise ConfigError("out", str(path), f"cannot be written: {err.strerror or err}") from None
    return Path(path)
