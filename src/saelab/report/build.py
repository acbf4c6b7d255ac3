"""`saelab report`: gather a run folder or results store, re-evaluate its SAEs, draw the figures, write one HTML file.

Sections (their HTML ids): leaderboard, tradeoff, features, dictionary, l0-sweep, training, geometry, provenance.
Each is either shown or kept with the reason it is omitted (no ground truth, SAE folders not on disk, a single L0,
no training history), so a reader always sees what is missing and why.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saelab import __version__
from saelab.errors import ConfigError, SaelabError
from saelab.formatting import mean_sd_parts
from saelab.io import write_text_atomic
from saelab.metrics.names import LANGUAGE_MODEL, METRICS, metric_keys
from saelab.plotting import figure_png_bytes
from saelab.report import figures as figs
from saelab.report.data import ReportSource, SAEEntry, load_report_source
from saelab.report.html import Figure, Section, esc, key_values, page, table

if TYPE_CHECKING:
    from saelab.saes.base import SAE

SECTION_IDS = ("leaderboard", "tradeoff", "features", "dictionary", "l0-sweep", "training", "geometry", "provenance")
NO_GT = "needs ground truth, and this source has no ground-truth scores (e.g. a run on real-model activations)"
L0_EVAL_SAMPLES = 4096  # held-out inputs for s_n^dec and measured L0 (the L0-sweep default)


@dataclass
class ReportResult:
    path: Path
    source: ReportSource
    sections: list[Section]
    partial: list[str]
    images: int
    notes: list[str] = field(default_factory=list)

    @property
    def shown(self) -> list[str]:
        return [s.id for s in self.sections if not s.omitted]

    @property
    def omitted(self) -> dict[str, str]:
        return {s.id: s.omitted for s in self.sections if s.omitted}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "—"
    m, sec = divmod(s, 60)
    h, m = divmod(int(m), 60)
    if s < 60:
        return f"{s:.1f} s"
    return (f"{h} h {m} min" if h else f"{m} min {sec:.0f} s") + f" ({s:,.0f} s)"


def _lm_handle(cfg: dict[str, Any], device: str, reason: str | None) -> tuple[Any, str | None]:
    """Held-out activations of a run trained straight from a local LM: the same model, layer and corpus."""
    model, dataset = Path(str(cfg["model"])), cfg.get("dataset")
    if not model.is_dir():
        return None, f"{reason}: its model folder {model} is not on this machine"
    if not dataset or not Path(str(dataset)).exists():
        return None, f"{reason}: its dataset {dataset} is not on this machine"
    from saelab.diagnostics.data import lm_data_handle

    try:
        return lm_data_handle(
            str(model),
            str(dataset),
            layer=cfg.get("layer"),
            hook_module=cfg.get("hook_module"),
            context_size=int(cfg.get("context_size") or 128),
            text_column=str(cfg.get("text_column") or "text"),
            model_batch_size=int(cfg.get("model_batch_size") or 8),
            buffer_size=int(cfg.get("buffer_size") or 16384),
            device=device,
        ), None
    except (SaelabError, OSError, RuntimeError, ValueError, ImportError) as err:
        return None, f"{reason}: cannot load it here: {err}"


class _Analysis:
    """Loads the data and SAEs once and keeps what several sections share."""

    def __init__(
        self, src: ReportSource, eval_samples: int, seed: int, device: str, max_saes: int, trust_code: bool = False
    ):
        self.src, self.eval_samples, self.seed, self.device, self.max_saes = src, eval_samples, seed, device, max_saes
        self.trust_code = trust_code
        self.notes: list[str] = []
        self.handle: Any = None
        self.data_error: str | None = None
        data, reason = src.data_and_reason()
        cfg = src.run_config
        if data is None and cfg.get("model"):
            self.handle, self.data_error = _lm_handle(cfg, device, reason)
        elif data is None:
            self.data_error = reason or "the source does not name its data"
        else:
            from saelab.diagnostics.data import resolve_data

            try:
                self.handle = resolve_data(str(data), device=device)
            except (SaelabError, OSError, RuntimeError, ValueError) as err:
                self.data_error = f"cannot rebuild the data {data!r}: {err}"
        self._saes: dict[int, SAE | None] = {}
        self._x: torch.Tensor | None = None
        self.diags: dict[int, tuple[dict[str, Any], Any]] = {}

    @property
    def model(self) -> Any:
        return None if self.handle is None else self.handle.model

    def on_disk(self) -> list[SAEEntry]:
        return [e for e in self.src.entries if e.folder is not None]

    def sae(self, entry: SAEEntry) -> SAE | None:
        """The entry's SAE, loaded once; None (and the source marked partial) when its folder is unreadable."""
        key = id(entry)
        if key in self._saes:
            return self._saes[key]
        sae = None
        if entry.folder is not None:
            from saelab.saes.formats import load_pretrained

            try:
                sae = load_pretrained(entry.folder, device=self.device, trust_code=self.trust_code)
            except SaelabError as err:
                self.src.partial.append(f"SAE {entry.name} could not be loaded: {err}")
                entry.missing_reason, entry.folder = str(err), None
        self._saes[key] = sae
        return sae

    def eval_x(self) -> torch.Tensor | None:
        if self._x is None and self.handle is not None:
            self._x = self.handle.eval_batch(L0_EVAL_SAMPLES, self.seed + 7919)
        return self._x

    def width_mismatch(self) -> str | None:
        """Why the rebuilt data cannot feed the SAEs (one is a transcoder, or the data's width differs from their
        d_in), or None."""
        if self.handle is None:
            return None
        for e in self.on_disk():
            sae = self.sae(e)
            if sae is not None and getattr(sae.cfg, "d_out", None) is not None:
                return (
                    f"{e.name} is a transcoder (it reads x and writes y): the sections that re-evaluate on the "
                    "input analyse autoencoders; its transcoder metrics are in the leaderboard"
                )
            if sae is not None and int(sae.d_in) != int(self.handle.d_in):
                return (
                    f"the data {self.handle.spec!r} has width {self.handle.d_in} but SAE {e.name} has d_in "
                    f"{int(sae.d_in)}: they do not belong together"
                )
        return None

    def x_or_reason(self) -> tuple[torch.Tensor | None, str | None]:
        mismatch = self.width_mismatch()
        if mismatch:
            return None, mismatch
        x = self.eval_x()
        return x, (None if x is not None else self.data_error)

    def focus(self) -> list[SAEEntry]:
        """The best SAE (by F1) of each architecture, best first, at most max_saes (per-feature sections)."""
        best: dict[str, SAEEntry] = {}
        for e in sorted(self.on_disk(), key=lambda e: -(_num(e.metrics.get("f1")) or -1.0)):
            best.setdefault(e.arch, e)
        return list(best.values())[: self.max_saes]

    def diagnose(self, entry: SAEEntry) -> tuple[dict[str, Any], Any] | None:
        key = id(entry)
        if key not in self.diags:
            from saelab.diagnostics.report import diagnose_sae

            sae = self.sae(entry)
            if sae is None:
                return None
            try:
                self.diags[key] = diagnose_sae(sae, self.handle, n_samples=self.eval_samples, seed=self.seed)
            except SaelabError as err:
                self.notes.append(f"{entry.name}: diagnostics failed: {err}")
                return None
        return self.diags[key]


# ------------------------------------------------------------------------------------------------ sections
def _leaderboard(a: _Analysis) -> Section:
    s = Section(
        "leaderboard",
        "Leaderboard",
        "saelab's runs (bold: the best) beside the published SynthSAEBench-16k reference rows (italic: "
        "16k protocol, width 4,096, 200M samples — only rows of the same protocol compare directly). "
        "Mean ± sd over seeds; a run on a budget other than its protocol's is its own row (samples: "
        "its budget, with the protocol's in brackets). Click a column header to sort.",
    )
    rows = a.src.leaderboard
    if not any(r.get("source") == "saelab" and r.get("f1_mean") is not None for r in rows):
        s.omitted = _no_gt_reason(a)
        return s
    if not any(r.get("source") == "published" for r in rows):  # e.g. a store of transcoders: no SAE baselines
        s.lead = s.lead.replace(
            " beside the published SynthSAEBench-16k reference rows (italic: 16k protocol, width 4,096, 200M "
            "samples — only rows of the same protocol compare directly)",
            "",
        )
    eval_counts = sorted({int(n) for e in a.src.entries if (n := _num(e.metrics.get("n_samples"))) is not None})
    if eval_counts:
        counts = " or ".join(f"{n:,}" for n in eval_counts)
        s.lead += (
            f" L0 and dead latents (never firing) are measured by each run's final evaluation, on {counts} fresh "
            "samples; sections below that re-evaluate say on how many."
        )
    from saelab.bench.leaderboard import board_metrics, is_transcoder_row

    # SAE rows: LEADERBOARD_METRICS; transcoder rows (tc-mini): F1, MCC, FVU, skip err, computing, L0, dead
    metrics = [METRICS[k] for k in board_metrics(rows)]
    if any(is_transcoder_row(r) for r in rows):
        s.lead += (
            " Transcoders: FVU is the unexplained share of their target y's variance, skip err ‖Ŝ − S‖/‖S‖ of the "
            "learned skip against the world's (— without a skip), computing the share of AND, suppression and "
            "fanout output features that got a latent of their own."
        )
    headers = [
        ("source · protocol", "text"),
        ("arch", "text"),
        ("L0 target", "num"),
        ("samples", "num"),
        ("seeds", "num"),
    ]
    several = any((r.get("n_seeds") or 0) > 1 for r in rows if r.get("source") == "saelab")
    headers += [(m.label, "num") for m in metrics] + ([("best F1", "num")] if several else []) + [("note", "text")]
    body, classes = [], []
    best_f1 = max(r["f1_mean"] for r in rows if r.get("source") == "saelab" and r.get("f1_mean") is not None)
    # saelab's rows first (best F1 first), then the published ones: the reader came for their own runs
    rows = sorted(rows, key=lambda r: r.get("source") != "saelab")
    from saelab.bench.export import format_budget
    from saelab.bench.protocols import PROTOCOLS

    # bf16 and fp32 runs of one config are separate rows: name the precision where the store holds both
    mixed = len({r.get("compute_precision") for r in rows if r.get("source") == "saelab"}) > 1
    for r in rows:
        src_proto = f"{r.get('source')} · {r.get('protocol')}"
        samples = r.get("samples")
        if samples is None and r.get("source") == "published" and r.get("protocol") in PROTOCOLS:
            samples = PROTOCOLS[str(r["protocol"])].samples  # the published runs trained the protocol's budget
        budget = format_budget(samples, r.get("protocol_samples"))
        if mixed and r.get("source") == "saelab":
            budget += f" · {r.get('compute_precision') or 'precision not recorded'}"
        cells = [
            (esc(src_proto), src_proto),
            (esc(r.get("arch")), r.get("arch")),
            (f"{r['l0_target']:g}", r["l0_target"]),
            (esc(budget), samples),
            (_fmt(r.get("n_seeds")), r.get("n_seeds")),
        ]
        for m in metrics:
            mean, sd = _num(r.get(f"{m.key}_mean")), _num(r.get(f"{m.key}_sd"))
            one_seed = r.get("source") == "saelab" and (r.get("n_seeds") or 0) <= 1  # no sd from one seed
            if mean is None:
                text = "—"
            else:
                mean_text, sd_text = mean_sd_parts(mean, sd, m.mean_digits)
                text = mean_text if one_seed else f"{mean_text} <small>{sd_text}</small>"
            cells.append((text, mean))
        if several:
            cells.append((_fmt(_num(r.get("f1_best"))), _num(r.get("f1_best"))))
        cells.append((esc(r.get("note") or ""), r.get("note") or ""))
        body.append(cells)
        published = r.get("source") == "published"
        classes.append("published" if published else ("best" if r.get("f1_mean") == best_f1 else ""))
    s.body.append(table(headers, body, row_classes=classes, table_id="leaderboard-table"))
    return s


def _tradeoff(a: _Analysis) -> Section:
    s = Section(
        "tradeoff",
        "F1, MCC, precision and recall against L0",
        "Per architecture, mean ± sd over seeds. Too low an L0 forces latents to merge or absorb features "
        "(recall falls); too high lets them fire on features that are not theirs (precision falls): the "
        "L0 that balances the two is where F1 peaks.",
    )
    gt = _by_budget([e for e in a.src.entries if e.has_ground_truth])
    if not gt:
        s.omitted = _no_gt_reason(a)
        return s
    s.body.append(
        Figure(
            figs.tradeoff_figure(gt),
            "F1, MCC, precision and recall against L0",
            "Bottom middle: precision against recall, each point labelled with its target L0.",
        ).html()
    )
    per_arch: dict[str, set[float]] = {}
    for e in gt:
        per_arch.setdefault(e.arch, set()).add(e.l0_target)
    if all(len(v) == 1 for v in per_arch.values()):
        s.body.append(
            '<p class="omit">Each architecture was run at a single L0 here, so the curves are points; '
            "sweep L0 (e.g. <code>saelab bench --l0 8 10 12 14 16</code>) to see the trade-off.</p>"
        )
    return s


def _by_budget(entries: list[SAEEntry]) -> list[SAEEntry]:
    """Entries whose architecture ran on several budgets or precisions, renamed 'arch · 1.5M' (or 'arch · 6M ·
    bf16') so the figures keep them apart (a 100k-sample run is no extra seed of a 6M one, nor a bf16 run of an
    fp32 one)."""
    from saelab.bench.export import format_budget
    from saelab.bench.leaderboard import precision_of

    budgets: dict[str, set[int | None]] = {}
    precisions: dict[str, set[str | None]] = {}
    for e in entries:
        budgets.setdefault(e.arch, set()).add(e.samples)
        precisions.setdefault(e.arch, set()).add(precision_of(e.metrics))

    def label(e: SAEEntry) -> str:
        parts = [e.arch]
        if len(budgets[e.arch]) > 1 or len(precisions[e.arch]) > 1:
            parts.append(format_budget(e.samples))
        if len(precisions[e.arch]) > 1:
            parts.append(precision_of(e.metrics) or "precision not recorded")
        return " · ".join(parts)

    return [dataclasses.replace(e, arch=label(e)) for e in entries]


def _no_gt_reason(a: _Analysis) -> str:
    if not any(e.metrics for e in a.src.entries):
        if a.src.kind == "store":
            return "the store has no complete run"
        return (
            "no SAE has results: the run stopped before its final evaluation"
            if a.src.partial
            else "no SAE has results in this source"
        )
    return NO_GT


def _need_model(a: _Analysis, s: Section) -> bool:
    if not a.src.has_ground_truth:
        s.omitted = _no_gt_reason(a)
    elif a.model is None:
        s.omitted = a.data_error or "the data has no ground-truth model"
    elif a.width_mismatch():
        s.omitted = a.width_mismatch()
    elif not a.on_disk():
        reasons = sorted({e.missing_reason for e in a.src.entries if e.missing_reason})
        s.omitted = "no SAE weights on disk to re-evaluate" + (f" ({'; '.join(reasons)})" if reasons else "")
    return s.omitted is None


def _features(a: _Analysis) -> Section:
    s = Section(
        "features",
        "Per true feature: recall against firing frequency",
        f"Re-evaluated on {a.eval_samples:,} fresh samples from the ground-truth model, for the best SAE of "
        "each architecture. A feature's recall is how often its matched latent (best decoder |cos|, at "
        "least 0.5) fires when the feature is active. Frequent parents whose recall drops while their "
        "children's does not are being absorbed; hedging shows as latents mixing in frequent features.",
    )
    if not _need_model(a, s):
        return s
    level_F = None
    h = getattr(a.model, "hierarchy", None)
    if h is not None and getattr(h, "compiled", None) is not None and hasattr(h.compiled, "level_F"):
        level_F = h.compiled.level_F
    panels, rows = [], []
    for e in a.focus():
        got = a.diagnose(e)
        if got is None or got[1] is None:
            continue
        row, diag = got
        f1 = _num(e.metrics.get("f1"))
        panels.append((f"{e.name}" + (f" (F1 {f1:.3f})" if f1 is not None else ""), diag, level_F))
        rows.append((e, row))
    if not panels:
        s.omitted = "no SAE could be re-evaluated (see the notes above)"
        return s
    s.body.append(
        Figure(
            figs.recall_frequency_figure(panels),
            "recall against firing frequency per true feature",
            "Each dot is a true feature; black: mean recall in log-frequency bins. Features never "
            "active in the sample are left out.",
        ).html()
    )
    headers = [
        ("SAE", "text"),
        ("absorption rate", "num"),
        ("parent silent | child active", "num"),
        ("parent silent | parent alone", "num"),
        ("hedging |excess cos| (top feature)", "num"),
        ("mixing 1−cos²", "num"),
        ("recall (activation-weighted)", "num"),
        ("features with a latent", "num"),
    ]
    body = []
    for e, r in rows:
        vals = [
            r.get(k)
            for k in (
                "absorption_rate",
                "parent_miss_rate_with_child",
                "parent_miss_rate_parent_only",
                "mean_abs_excess_cos_top1",
                "mean_mixing",
                "recall_weighted",
                "features_with_latent",
            )
        ]
        body.append(
            [(esc(e.name), e.name)] + [(_fmt(_num(v), 0 if k == 6 else 3), _num(v)) for k, v in enumerate(vals)]
        )
    s.body.append(table(headers, body))
    s.body.append(
        "<p class=\"lead\">Absorption: the parent's latent is silent while a child's latent fires and "
        "carries the parent direction. Hedging: how much of the most frequent true feature other latents' "
        "decoders mix in beyond the geometry of their own feature.</p>"
    )
    return s


def _dictionary(a: _Analysis, heatmap_latents: int) -> Section:
    s = Section(
        "dictionary",
        "The learned dictionary against the truth",
        "How close each decoder row is to some true feature, and a sample of latents against the features they match.",
    )
    if not _need_model(a, s):
        return s
    from saelab.metrics.matching import match_decoder_to_features

    feats = a.model.feature_vectors_FD.detach()
    per_sae = []
    focus = a.focus()
    for e in focus:
        sae = a.sae(e)
        if sae is None:
            continue
        W = sae.W_dec_LD.detach()
        best = match_decoder_to_features(W, feats.to(W.device), hungarian=False).best_cos_L
        got = a.diagnose(e)
        fired = got[1].latent_stats.get("fired") if got and got[1] is not None else None
        per_sae.append((e.name, best, fired))
    if not per_sae:
        s.omitted = "no SAE could be loaded"
        return s
    s.body.append(
        Figure(
            figs.best_cos_figure(per_sae),
            "best |cos| of each latent with a true feature",
            f"Right: {esc(per_sae[0][0])}; a dead latent never fired on the {a.eval_samples:,} re-evaluation samples"
            + _dead_elsewhere(next(x for x in focus if x.name == per_sae[0][0]), a.eval_samples)
            + ".",
        ).html()
    )
    e = next(x for x in focus if x.name == per_sae[0][0])
    sae = a.sae(e)
    assert sae is not None  # per_sae holds only entries whose SAE loaded (and stays cached)
    png, info = figs.similarity_heatmap_figure(
        e.name, sae.W_dec_LD.detach(), feats, n_latents=heatmap_latents, seed=a.seed, live_L=per_sae[0][2]
    )
    s.body.append(
        Figure(
            png,
            "similarity heatmap of sampled latents and their matched true features",
            f"{info['latents']} live latents of {esc(e.name)} sampled at random; {info['features']} "
            f"distinct matched features ({info['shared']} latents share a feature with another sampled "
            f"latent); mean |cos| on the diagonal {info['diag_mean']:.3f}.",
        ).html()
    )
    return s


def _dead_elsewhere(e: SAEEntry, eval_samples: int) -> str:
    """Why this section's dead count may differ from the leaderboard's: another number of samples."""
    dead, n = _num(e.metrics.get("dead_latents")), _num(e.metrics.get("n_samples"))
    if dead is None:
        return ""
    where = f"its run's final evaluation on {int(n):,} samples" if n is not None else "its run's final evaluation"
    why = "" if n is None or int(n) == eval_samples else " (a latent that fires rarely can be silent on fewer samples)"
    return f"; the leaderboard's count for this SAE, {dead:.0f}, comes from {where}{why}"


def _sweep_group(a: _Analysis) -> list[SAEEntry]:
    groups: dict[tuple, dict[float, SAEEntry]] = {}
    for e in a.on_disk():
        groups.setdefault((e.protocol, e.arch, e.seed, e.data, e.width, e.samples), {})[e.l0_target] = e
    best = max(groups.values(), key=len, default={})
    return [best[k] for k in sorted(best)] if len(best) >= 2 else []


def _l0_sweep(a: _Analysis) -> Section:
    s = Section(
        "l0-sweep",
        "L0 sweep: the proxy metrics that need no ground truth",
        "For one architecture trained at several L0s: the n-th decoder projection s<sub>n</sub><sup>dec</sup> "
        "and the mean pairwise |cos| of decoder rows (both lower = cleaner), with saelab's recommended L0 "
        "and, on synthetic data, the true L0 marked.",
    )
    group = _sweep_group(a)
    if not group:
        l0s = sorted({e.l0_target for e in a.on_disk()})
        s.omitted = "needs one architecture saved at two or more L0s; this source has " + (
            f"L0 {', '.join(f'{v:g}' for v in l0s)} only" if l0s else "no SAE weights on disk"
        )
        return s
    x, why = a.x_or_reason()
    if x is None:
        s.omitted = f"s_n^dec needs input activations: {why}"
        return s
    from saelab.diagnostics.l0_plot import l0_sweep_figure
    from saelab.diagnostics.l0_select import L0Point, default_ns, recommend_l0
    from saelab.diagnostics.l0_sweep import L0SweepResult, score_sae, synthetic_true_l0

    saes = [(e, a.sae(e)) for e in group]
    saes = [(e, sae) for e, sae in saes if sae is not None]
    width = int(saes[0][1].W_dec_LD.shape[0])
    ns = default_ns([e.l0_target for e, _ in saes], width)
    points = []
    for e, sae in saes:
        s_dec, cos, measured = score_sae(sae, x.to(sae.W_dec_LD.device), ns)
        gt = {k: float(e.metrics[k]) for k in ("f1", "mcc") if _num(e.metrics.get(k)) is not None}
        points.append(
            L0Point(
                l0_target=e.l0_target,
                s_dec=s_dec,
                decoder_abs_cos=cos,
                l0_measured=measured,
                name=e.name,
                ground_truth=gt,
            )
        )
    if len(points) < 2:
        s.omitted = "fewer than two SAEs of the sweep could be loaded"
        return s
    rec = recommend_l0(points, d_sae=width)
    true_l0 = first = None
    if a.model is not None:
        true_l0, first = synthetic_true_l0(a.model, width, n_samples=min(a.eval_samples, 50_000))
    sweep = L0SweepResult(
        data=str(a.src.data),
        arch=group[0].arch,
        width=width,
        points=points,
        recommendation=rec,
        true_l0=true_l0,
        true_l0_first_width=first,
    )
    png = figure_png_bytes(l0_sweep_figure(sweep))
    truth = (
        f"; true L0 of the first {width} features {first:.2f} (all features {true_l0:.2f})" if first is not None else ""
    )
    s.body.append(
        Figure(
            png,
            "L0 proxy metrics against L0",
            f"{esc(group[0].arch)}, width {width}, L0 {', '.join(f'{p.l0_target:g}' for p in points)}. "
            f"Recommended L0 <b>{rec.recommended_l0:g}</b> ({esc(rec.method)}){esc(truth)}.",
        ).html()
    )
    if rec.warnings:
        s.body.append("<ul>" + "".join(f'<li class="omit">{esc(w)}</li>' for w in rec.warnings) + "</ul>")
    return s


def _training(a: _Analysis) -> Section:
    s = Section(
        "training",
        "Training curves",
        "Logged during training on the training batches (per logging interval), one colour per SAE. These are "
        "not the final figures: a TopK-family SAE's training L0 is k by construction (its inference threshold is "
        "set at the end), and AuxK counts a latent dead only after it is silent for its dead window of steps, "
        "so a run shorter than that shows 0 dead however many latents are silent. The silent count (no firing "
        "in the last 100k training samples, or the last half of a shorter run) estimates the final dead count; "
        "the diamonds are the final evaluation: the inference SAE on fresh samples, the figures the leaderboard "
        "shows.",
    )
    best_dir = a.src.store_summary.get("best_run_dir") if a.src.kind == "store" else None
    shown = [e for e in a.src.entries if best_dir is None or str(e.run_dir) == best_dir]  # the history's run
    names = list(dict.fromkeys(e.name for e in shown))
    if not names:
        names = sorted({k.split("/")[0] for h in a.src.history for k in h if "/" in k})
    finals = {e.name: e.metrics for e in shown if e.metrics}
    window = _num(a.src.run_config.get("dead_feature_window"))
    png = figs.history_figure(a.src.history, names, finals, int(window) if window else None) if a.src.history else None
    s.body.extend(_warnings_html(a))
    if png is None:
        where = "the best run's folder" if a.src.kind == "store" else "run.json"
        s.omitted = f"{where} has no training history" + (
            f" ({a.src.store_summary.get('best_run_dir') or 'run folder not on this machine'})"
            if a.src.kind == "store"
            else ""
        )
        return s
    s.body.append(Figure(png, "loss, L0, explained variance and dead latents during training").html())
    return s


def _warnings_html(a: _Analysis, limit: int = 20) -> list[str]:
    """The end-of-run warnings (runs/warnings.py) of every SAE in the source, as one list."""
    from saelab.runs.warnings import RunBudget, run_warnings

    lines = []
    for e in a.src.entries:
        cfg = e.run_config
        if not e.metrics or not e.width:
            continue
        budget = RunBudget(
            width=int(e.width),
            samples=e.samples,
            batch_size=_int(cfg.get("batch_size")),
            dead_feature_window=_int(cfg.get("dead_feature_window")),
            protocol=e.protocol if a.src.kind == "store" else None,
            protocol_samples=e.protocol_samples,
        )
        seed = f"seed {e.seed}: " if a.src.kind == "store" else ""
        lines += [seed + w for w in run_warnings({**e.metrics, "name": e.name}, budget)]
    if not lines:
        return []
    more = f"<li>… and {len(lines) - limit} more</li>" if len(lines) > limit else ""
    items = "".join(f"<li>{esc(w)}</li>" for w in lines[:limit])
    return [f'<div class="banner" id="run-warnings"><strong>Warnings</strong><ul>{items}{more}</ul></div>']


def _int(value: Any) -> int | None:
    v = _num(value)
    return None if v is None else int(v)


def _geometry(a: _Analysis) -> Section:
    s = Section(
        "geometry",
        "Decoder geometry and reconstruction (no ground truth needed)",
        "Weights-only and activation-only measures that work on any SAE, including ones trained on a real model.",
    )
    entries = [e for e in a.on_disk()][: max(a.max_saes, 8)]
    # spliced-LM metrics, recorded by runs on a language model's activations
    lm = [k for k in metric_keys(LANGUAGE_MODEL) if any(_num(e.metrics.get(k)) is not None for e in entries)]
    rows, hist = [], []
    x, why = a.x_or_reason()
    from saelab.diagnostics.projection import decoder_pairwise_abs_cos
    from saelab.diagnostics.report import default_n_for

    for e in entries:
        sae = a.sae(e)
        if sae is None:
            continue
        W = sae.W_dec_LD.detach()
        mx = figs.max_cos_to_other_latents(W)
        hist.append((e.name, mx))
        cos = decoder_pairwise_abs_cos(W)
        s_dec = n = measured = None
        if x is not None:
            from saelab.diagnostics.l0_sweep import score_sae

            _, _, measured = score_sae(sae, x.to(W.device), [1])
            n = default_n_for(measured, W.shape[0])
            s_dec = score_sae(sae, x.to(W.device), [n])[0][n] if n < W.shape[0] else None
        rows.append(
            [
                (esc(e.name), e.name),
                (f"{e.l0_target:g}", e.l0_target),
                (_fmt(_num(measured), 2), _num(measured)),
                (_fmt(_num(e.metrics.get("explained_variance")), 4), _num(e.metrics.get("explained_variance"))),
                (_fmt(e.metrics.get("dead_latents")), _num(e.metrics.get("dead_latents"))),
                (_fmt(n), n),
                (_fmt(_num(s_dec), 4), _num(s_dec)),
                (_fmt(cos, 4), cos),
                (_fmt(float(mx.median()), 3), float(mx.median())),
            ]
            + [(_fmt(_num(e.metrics.get(k)), 4), _num(e.metrics.get(k))) for k in lm]
        )
    if not rows:
        reasons = sorted({e.missing_reason for e in a.src.entries if e.missing_reason})
        s.omitted = "no SAE weights on disk" + (f" ({'; '.join(reasons)})" if reasons else "")
        return s
    headers = [
        ("SAE", "text"),
        ("L0 target", "num"),
        ("L0 measured", "num"),
        (METRICS["explained_variance"].label, "num"),
        (METRICS["dead_latents"].label, "num"),
        ("n", "num"),
        ("s_n^dec", "num"),
        ("decoder mean |cos|", "num"),
        ("median max |cos|", "num"),
    ]
    headers += [(METRICS[k].axis_label, "num") for k in lm]
    s.body.append(table(headers, rows))
    if x is None:
        s.body.append(f'<p class="omit">s_n^dec and the measured L0 need input activations: {esc(why)}.</p>')
    s.body.append(
        Figure(
            figs.decoder_geometry_figure(hist),
            "decoder self-similarity histogram",
            "A latent whose decoder row nearly repeats another's (|cos| near 1) is a duplicate.",
        ).html()
    )
    return s


def _provenance(a: _Analysis) -> Section:
    s = Section("provenance", "Configuration and provenance")
    env = a.src.envelope
    hw = env.get("hardware") or {}
    items = [
        ("source", f"{a.src.kind}: {a.src.path}"),
        ("status", env.get("status")),
        ("saelab version", env.get("saelab_version")),
        ("commit", env.get("commit")),
        ("started (UTC)", env.get("time")),
        ("wall time", _duration(env.get("wall_seconds"))),
        ("config hash", env.get("config_hash")),
    ]
    if env.get("bench_config_hash"):
        items.append(("bench config hash (run config + protocol defaults)", env["bench_config_hash"]))
    if a.src.kind == "store":
        ss = a.src.store_summary
        items = [
            ("source", f"results store: {a.src.path}"),
            ("runs", f"{ss.get('runs')} ({ss.get('complete')} complete)"),
            ("protocols", ", ".join(ss.get("protocols", []))),
            ("first / last started (UTC)", f"{ss.get('first_started')} / {ss.get('last_started')}"),
            ("total wall time", _duration(ss.get("total_wall_seconds"))),
            ("shown below", f"run {env.get('run_id')} (the best F1), its run folder {ss.get('best_run_dir')}"),
        ] + items[1:]
    if a.src.kind == "run" and env.get("train_samples_per_second"):
        items.append(("training throughput", f"{env['train_samples_per_second']:,.0f} samples/s"))
    items += [(f"hardware: {k}", v) for k, v in hw.items()]
    s.body.append(key_values(items))
    cfg = env.get("config") or {}
    if isinstance(cfg, dict) and cfg:
        s.body.append('<h3 style="font-size:14px;margin:14px 0 4px">Configuration</h3>')
        s.body.append(key_values(_config_items(a, cfg)))
    return s


def _config_items(a: _Analysis, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's settings (floats to 4 significant digits, the LR schedule in words), then, for a bench run, the
    protocol's defaults, labelled as such: a protocol's `seeds` is how many it recommends, not how many ran."""
    raw_run, raw_proto = cfg.get("run"), cfg.get("protocol")
    run: dict[str, Any] = raw_run if isinstance(raw_run, dict) else cfg
    proto = raw_proto if isinstance(raw_proto, dict) else None
    items: list[tuple[str, Any]] = []
    for k, v in run.items():
        items.append((k, describe_lr_schedule(run) if k == "lr_schedule" else _short(v)))
    if proto is not None:
        seeds = _seeds_run(a)
        if seeds:
            items.append(("seeds run (this arch, L0 and budget)", f"{len(seeds)}: {', '.join(map(str, seeds))}"))
        for k, v in proto.items():
            label = "protocol" if k == "name" else f"protocol default: {k}"
            if k == "seeds":
                label = "protocol default: seeds (recommended; see seeds run)"
            items.append((label, _short(v)))
    return items


def _seeds_run(a: _Analysis) -> list[int]:
    """Seeds in the source of the (protocol, arch, L0, budget) the provenance describes (the best run's)."""
    run_id = a.src.envelope.get("run_id")
    best = next((e for e in a.src.entries if e.metrics.get("run_id") == run_id), None)
    if best is None:
        return sorted({e.seed for e in a.src.entries})
    same = (best.protocol, best.arch, best.l0_target, best.samples)
    return sorted({e.seed for e in a.src.entries if (e.protocol, e.arch, e.l0_target, e.samples) == same})


def describe_lr_schedule(cfg: dict[str, Any]) -> str:
    """'constant 0.002, then linear decay to 0 over the final 33.3% of steps' from a run config's LR fields:
    `lr_schedule` alone says constant for a schedule that decays through `lr_decay_fraction`."""
    lr = _num(cfg.get("lr"))
    kind = str(cfg.get("lr_schedule") or "constant")
    text = f"{kind} {_short(lr)}" if lr is not None else kind
    if kind == "cosine":
        end = _num(cfg.get("lr_end_factor"))
        text += f" (down to {_short(end)} × lr)" if end is not None else ""
    warmup = _num(cfg.get("lr_warmup_steps"))
    if warmup:
        text = f"linear warm-up over {warmup:,.0f} steps, then {text}"
    decay = _num(cfg.get("lr_decay_fraction"))
    if decay:
        text += f", then linear decay to 0 over the final {100 * decay:.3g}% of steps"
    return text


def _short(value: Any) -> Any:
    """Floats to 4 significant digits (0.3333, 0.002), also inside lists and dicts; everything else as is."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ entry point
def build_report(
    source: str | Path,
    out: str | Path,
    *,
    eval_samples: int = 50_000,
    seed: int = 0,
    device: str = "cpu",
    max_saes: int = 4,
    heatmap_latents: int = 40,
    command: str | None = None,
    trust_code: bool = False,
) -> ReportResult:
    """Write the HTML report for a run folder or results store to `out` (atomically) and return what it holds.

    `trust_code`: import the class an SAE folder's cfg.json names if it is not registered (see `load_sae`)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError("out", str(out), "must end in .html")
    if out.exists() and out.is_dir():
        raise ConfigError("out", str(out), "is a folder; give a file name such as report.html")
    for name, v in (("eval_samples", eval_samples), ("max_saes", max_saes), ("heatmap_latents", heatmap_latents)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(name, v, "must be a positive integer")
    src = load_report_source(source)
    a = _Analysis(src, eval_samples, seed, device, max_saes, trust_code=trust_code)
    sections = [
        _leaderboard(a),
        _tradeoff(a),
        _features(a),
        _dictionary(a, heatmap_latents),
        _l0_sweep(a),
        _training(a),
        _geometry(a),
        _provenance(a),
    ]
    notes = list(a.notes)
    if src.kind == "store":
        missing = [e for e in src.entries if e.folder is None]
        if missing and any(e.folder for e in src.entries):
            notes.append(
                f"{len(missing)} complete run(s) have no SAE folder on disk ({missing[0].missing_reason}, "
                "...): their per-feature sections are not shown"
            )
    env = src.envelope
    data = src.data or "unknown data"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"saelab report — {src.path.name}"
    subtitle = (
        f"{esc('run folder' if src.kind == 'run' else 'results store')} <code>{esc(src.path)}</code> · data "
        f"<code>{esc(data)}</code> · saelab {esc(env.get('saelab_version'))} · commit "
        f"<code>{esc(str(env.get('commit'))[:12])}</code> · {len(src.entries)} SAE(s)"
        + (" · <b>PARTIAL</b>" if src.partial else "")
    )
    footer = (
        f"Generated {esc(when)} by saelab {esc(__version__)}"
        + (f" with <code>{esc(command)}</code>" if command else "")
        + ". Self-contained: every figure is embedded; the file needs no network."
    )
    text = page(title, subtitle, sections, src.partial, notes, footer)
    write_text_atomic(out, text)  # mode 0666 minus the umask, as any new file: a report is meant to be shared
    images = text.count("<img ")
    return ReportResult(path=out, source=src, sections=sections, partial=list(src.partial), images=images, notes=notes)
