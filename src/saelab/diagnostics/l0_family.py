"""The correct-L0 check on an existing family of SAEs (`saelab l0 --saes DIR DIR ...`).

"Sparse but Wrong" ran its check on Gemma Scope's family of SAEs trained at several L0s. Here the
SAEs come from folders in any format saelab reads (`runs.pretrained.load_pretrained_sae`) instead of
being trained: each is scored on the same held-out batch `run_l0_sweep` uses (`score_sae`: s_n^dec
for every n, decoder |cos|, measured L0) and `recommend_l0` applies the same rule. The family must
share d_in (the data's) and the width d_sae (the rule caps n by it).

Each SAE's place on the L0 axis is, in order of preference: the labels given (`l0s=`, one per
folder, e.g. the L0s a release names its SAEs by); the target L0 every folder records (saelab's
`metadata.l0_target`, or a TopK SAE's k), so a family saelab trained recommends exactly what
`saelab l0` did; else the L0 measured on the held-out batch (rounded to 0.01). Which one was
used is `config["l0_source"]`: given, recorded or measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saelab.diagnostics.l0_plot import plot_l0_sweep
from saelab.diagnostics.l0_select import DEFAULT_TOLERANCE, L0Point, default_ns, recommend_l0
from saelab.diagnostics.l0_sweep import POINT_EVAL_METRICS, L0SweepResult, score_sae, synthetic_true_l0
from saelab.errors import ConfigError, require

EVAL_SEED_OFFSET = 7919  # the held-out batch `run_l0_sweep` scores its SAEs on
GT_SEED_OFFSET = 12345  # the ground-truth evaluation seed of a training run's final scores


def family_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The SAE folders named; a saelab run folder (run.json + saes/) stands for every SAE in it."""
    folders: list[Path] = []
    for p in paths:
        path = Path(p)
        if (path / "run.json").is_file() and (path / "saes").is_dir():
            folders.extend(sorted(q for q in (path / "saes").iterdir() if q.is_dir()))
        else:
            folders.append(path)
    require(len(folders) > 0, "saes", list(paths), "name at least one SAE folder")
    seen = set()
    for f in folders:
        key = f.resolve()
        require(key not in seen, "saes", str(f), "is named twice")
        seen.add(key)
    return folders


@torch.no_grad()
def measured_l0(sae: Any, x_BD: torch.Tensor) -> float:
    sae.eval()
    acts_BL = sae.encode(x_BD.to(sae.W_dec_LD.device))
    return float((acts_BL != 0).float().sum(1).mean())


def run_l0_family(
    saes: Sequence[str | Path],
    data: str | Any,
    l0s: Sequence[float] | None = None,
    ns: Sequence[int] | None = None,
    eval_samples: int = 4096,
    gt_eval_samples: int = 20_000,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    plot: bool = True,
) -> L0SweepResult:
    """Score the SAEs in `saes` (folders) on `data` and recommend an L0 (see the module docstring).

    `data`: preset, synthetic-model folder, activation file or cache folder, or a `DataHandle`.
    Writes `l0_sweep.json` and `l0_sweep.png` to `out_dir` when given."""
    from saelab.diagnostics.data import DataHandle, resolve_data
    from saelab.io import write_json_atomic
    from saelab.runs.pretrained import folder_metadata, load_pretrained_sae, recorded_l0

    started = time.perf_counter()
    folders = family_folders(saes)
    if l0s is not None:
        require(
            len(l0s) == len(folders),
            "l0",
            list(l0s),
            f"give one L0 per SAE folder ({len(folders)}), in the same order, or none",
        )
    require(
        isinstance(eval_samples, int) and eval_samples > 0, "eval_samples", eval_samples, "must be a positive integer"
    )
    handle = data if isinstance(data, DataHandle) else resolve_data(str(data), device=device)
    loaded = []
    for folder in folders:
        sae = load_pretrained_sae(folder, device=device)
        if sae.cfg.d_in != handle.d_in:
            raise ConfigError(
                "saes", str(folder), f"has d_in={sae.cfg.d_in} but the data {handle.spec} has d_in={handle.d_in}"
            )
        if loaded and sae.cfg.d_sae != loaded[0][1].cfg.d_sae:
            raise ConfigError(
                "saes",
                str(folder),
                f"has width d_sae={sae.cfg.d_sae} but {folders[0]} has {loaded[0][1].cfg.d_sae}; a family shares one width",
            )
        loaded.append((folder, sae))
    width = int(loaded[0][1].cfg.d_sae)
    require(width >= 2, "saes", str(folders[0]), f"has width d_sae={width}; the check needs at least 2 latents")

    x_eval = handle.eval_batch(eval_samples, seed + EVAL_SEED_OFFSET).to(device)
    measured = [measured_l0(sae, x_eval) for _, sae in loaded]
    recorded = [recorded_l0(folder_metadata(f), sae) for f, sae in loaded]
    if l0s is not None:
        labels, source = [float(v) for v in l0s], "given"
        for v in labels:
            require(math.isfinite(v) and v > 0, "l0", v, "must be a positive number")
    elif all(r is not None for r in recorded):
        labels, source = [float(r) for r in recorded if r is not None], "recorded"
    else:
        labels, source = [round(m, 2) for m in measured], "measured"
    for i, v in enumerate(labels):
        for j in range(i):
            if labels[j] == v:
                raise ConfigError(
                    "saes",
                    str(folders[i]),
                    f"has the same L0 ({v:g}, {source}) as {folders[j]}; a family needs distinct L0s",
                )

    use_ns = list(ns) if ns is not None else []
    for n in use_ns:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("n", n, "must be a positive integer")
        if n >= width:
            raise ConfigError("n", n, f"must be smaller than the SAE width {width} (the reference uses n < width/2)")
    all_ns = sorted(set(use_ns or default_ns([math.ceil(v) for v in labels], width)))

    points = []
    for (folder, sae), label, l0_measured in zip(loaded, labels, measured):
        s_dec, cos, _ = score_sae(sae, x_eval, all_ns)
        gt: dict[str, float] = {}
        if handle.model is not None:
            from saelab.metrics import evaluate_sae_on_synthetic

            scores = evaluate_sae_on_synthetic(sae, handle.model, gt_eval_samples, seed=seed + GT_SEED_OFFSET).to_dict()
            gt = {k: float(scores[k]) for k in POINT_EVAL_METRICS if isinstance(scores.get(k), (int, float))}
        points.append(
            L0Point(
                l0_target=label,
                s_dec=s_dec,
                decoder_abs_cos=cos,
                l0_measured=l0_measured,
                name=str(folder),
                ground_truth=gt,
            )
        )
    points.sort(key=lambda p: p.l0_target)
    rec = recommend_l0(points, ns=use_ns or None, tolerance=tolerance, d_sae=width)
    true_l0 = first = None
    if handle.model is not None:
        true_l0, first = synthetic_true_l0(handle.model, width)
    archs = sorted({sae.architecture for _, sae in loaded})
    sweep = L0SweepResult(
        data=handle.spec,
        arch=",".join(archs),
        width=width,
        points=points,
        recommendation=rec,
        true_l0=true_l0,
        true_l0_first_width=first,
        run_dir=str(out_dir) if out_dir is not None else None,
        config={
            "saes": [str(f) for f in folders],
            "l0_source": source,
            "ns_fixed": use_ns or None,
            "eval_samples": eval_samples,
            "gt_eval_samples": gt_eval_samples if handle.model is not None else None,
            "tolerance": tolerance,
            "seed": seed,
        },
        wall_seconds=time.perf_counter() - started,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "l0_sweep.json", sweep.to_dict())
        if plot:
            plot_l0_sweep(sweep, out / "l0_sweep.png")
    return sweep


def recommended_sae(sweep: L0SweepResult) -> str | None:
    """The folder of the SAE at the recommended L0 (None when the knee fell between SAEs)."""
    return next((p.name for p in sweep.points if p.l0_target == sweep.recommended_l0), None)
