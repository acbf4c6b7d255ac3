"""Is a variant better than its base? Train both on the same streams and compare them paired by seed.

Each seed is one run: the base and every variant train together on that seed's data stream (so they see the
same samples) and are scored against the ground truth; seeds run in parallel worker processes. Per variant and
metric, `bench.paired.paired_delta` gives the mean difference to the base over the seeds both finished, its
standard error, the 95% t-interval, a verdict (better / worse / unresolved) and the smallest difference these
seeds can resolve. A wall-time budget (`max_minutes`) stops training cleanly and marks the result partial.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.bench.leaderboard import metric_value
from saelab.bench.paired import paired_delta
from saelab.bench.protocols import Protocol, tier_of
from saelab.bench.runner import BenchRequest, load_data, reserve_run_dirs, run_bench, run_training
from saelab.bench.variants import VariantSpec, resolve_arch
from saelab.errors import ConfigError, require

DEFAULT_METRICS = ("f1", "mcc")
PROBE_STEPS = 20


def metric_direction(key: str) -> bool | None:
    """True when higher is better, False when lower is, None when neither (L0, shrinkage); ConfigError naming
    an unknown metric."""
    from saelab.metrics.names import metric

    return metric(key).higher_is_better


@dataclass
class Arm:
    """One architecture of a comparison: what the user typed and the registered name that trains."""

    text: str
    arch: str
    spec: VariantSpec | None = None


@dataclass
class CompareRequest:
    protocol: Protocol
    base: str
    variants: list[str]
    seeds: list[int]
    l0: float | None = None  # default: the protocol's natural L0
    samples: int | None = None  # default: the protocol's budget (or its `tier`)
    tier: str | None = None
    eval_samples: int | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    device: str = "cpu"
    out_dir: Path = Path("runs/compare")
    jobs: int = 1
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        require(len(self.variants) > 0, "variant", self.variants, "name at least one variant to compare")
        require(len(self.seeds) > 0, "seeds", self.seeds, "need at least one seed")
        require(isinstance(self.jobs, int) and self.jobs >= 1, "jobs", self.jobs, "must be a positive integer")
        require(
            self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
            "max_minutes",
            self.max_minutes,
            "must be a positive number of minutes",
        )
        if self.samples is not None and self.tier is not None:
            raise ConfigError("tier", self.tier, "give a tier or a number of samples, not both")
        if self.tier is not None:
            self.samples = self.protocol.tier_samples(self.tier)
        elif self.samples is None:
            self.samples = self.protocol.samples
        else:
            self.tier = tier_of(self.protocol, self.samples)
        require(
            isinstance(self.samples, int) and self.samples >= self.protocol.batch_size,
            "samples",
            self.samples,
            f"must be at least one batch ({self.protocol.batch_size})",
        )
        if self.l0 is None:
            self.l0 = float(self.protocol.natural_l0)
        self.metrics = list(dict.fromkeys(["f1", "mcc", *self.metrics]))
        for m in self.metrics:
            metric_direction(m)  # an unknown metric fails now, not after training

    def check_dims(self) -> dict[str, Any]:
        p = self.protocol
        assert self.l0 is not None and self.samples is not None  # resolved from the protocol on construction
        return {
            "d_in": max(1, p.width // 4),
            "d_sae": p.width,
            "l0": float(self.l0),
            "total_steps": max(1, int(self.samples) // p.batch_size),
        }


def resolve_arms(request: CompareRequest) -> tuple[Arm, list[Arm]]:
    """Resolve (and register) the base and each variant; ConfigError for a repeat or a clash of names."""
    from saelab.saes.registry import arch_label

    dims = request.check_dims()
    base_arch, base_spec = resolve_arch(request.base, **dims)
    base = Arm(request.base, base_arch, base_spec)
    arms: list[Arm] = []
    seen = {base.arch: base.text}
    labels = {arch_label(base.arch): base.text}
    for text in request.variants:
        arch, spec = resolve_arch(text, **dims)
        if arch in seen:
            what = "the base" if seen[arch] == base.text and arch == base.arch else repr(seen[arch])
            raise ConfigError("variant", text, f"is the same architecture as {what}; name each variant once")
        label = arch_label(arch)
        if label in labels:  # SAE folders are named by label: two arms must not share one
            raise ConfigError(
                "variant",
                text,
                f"would save under the same folder name {label!r} as "
                f"{labels[label]!r}; rename one of the files or classes",
            )
        seen[arch], labels[label] = text, text
        arms.append(Arm(text, arch, spec))
    return base, arms


def bench_request(request: CompareRequest, base: Arm, arms: Sequence[Arm]) -> BenchRequest:
    assert request.l0 is not None  # resolved from the protocol on construction
    return BenchRequest(
        protocol=request.protocol,
        archs=[base.arch, *(a.arch for a in arms)],
        l0s=[float(request.l0)],
        seeds=list(request.seeds),
        device=request.device,
        samples=request.samples,
        out_dir=Path(request.out_dir),
        eval_samples=request.eval_samples,
        variants=[a.spec for a in (base, *arms) if a.spec is not None],
    )


# --------------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    seconds: float
    step_seconds: float
    steps: int
    rounds: int
    setup_seconds: float
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "estimate",
            "seconds": self.seconds,
            "minutes": self.seconds / 60,
            "step_seconds": self.step_seconds,
            "steps": self.steps,
            "rounds": self.rounds,
            "setup_seconds": self.setup_seconds,
            "basis": self.basis,
        }

    def describe(self) -> str:
        return f"estimated wall time ~{format_duration(self.seconds)} ({self.basis})"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def worker_threads(jobs: int, device: str, workers: bool) -> int:
    """The threads a seed trains on: as bench.runner gives them (each worker cpu_count // jobs)."""
    import os

    import torch

    if device != "cpu" or not workers:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // jobs)


def estimate_wall_time(
    bench: BenchRequest, jobs: int, probe_steps: int = PROBE_STEPS, workers: bool | None = None
) -> Estimate:
    """Time `probe_steps` training steps of one seed's SAEs (all arms, one stream, the threads a worker gets)
    and extrapolate to the whole budget, plus each worker's start-up (taken as this process's own: the same
    imports and data). It is an estimate: the first steps can be slower or faster than the rest (k schedules,
    warm caches), other load on the machine slows the run down (the probe runs alone), and the final evaluation
    is counted only at the probe's small size (its fixed costs; evaluating more samples adds more)."""
    import os

    import torch

    from saelab.io import process_start_time

    if workers is None:
        workers = jobs > 1 and len(bench.seeds) > 1
    startup = max(0.0, time.time() - process_start_time()) if workers else 0.0
    cfg = bench.run_config(bench.seeds[0])
    steps = cfg.train_config().total_steps
    probe_steps = max(1, min(probe_steps, steps))
    probe = dataclasses.replace(
        cfg,
        samples=probe_steps * cfg.batch_size,
        eval_samples=cfg.batch_size,
        checkpoint_minutes=0.0,
        checkpoint_every=0,
        eval_every=0,
    )
    threads = worker_threads(jobs, bench.device, workers)
    old_threads = torch.get_num_threads()
    started = time.perf_counter()
    torch.set_num_threads(threads)
    try:
        model = load_data(bench.protocol.data, device=bench.device)
        with tempfile.TemporaryDirectory(prefix="saelab-estimate-") as tmp:
            result = run_training(probe, Path(tmp) / "probe", progress=False, model=model)
    finally:
        torch.set_num_threads(old_threads)
    wall = time.perf_counter() - started
    step_s = cfg.batch_size / max(result.samples_per_second, 1e-9)
    setup = max(0.0, wall - probe_steps * step_s)  # data, SAE set-up, a small evaluation, saving
    rounds = math.ceil(len(bench.seeds) / max(1, min(jobs, len(bench.seeds))))
    seconds = startup + rounds * (steps * step_s + setup)
    n_saes = len(cfg.sae_names())
    basis = (
        f"timed {probe_steps} training steps of the {n_saes} SAEs of one seed on {threads} thread(s): "
        f"{step_s * 1000:.0f} ms/step × {steps:,} steps, {rounds} round(s) of seeds"
        + (f", worker start-up ~{startup:.0f} s" if workers else "")
        + f"; evaluating {cfg.eval_samples:,} samples per SAE adds to it"
    )
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if bench.device == "cpu" and load > cores - 0.5:
        basis += f"; the machine is busy (load average {load:.1f} on {cores} cores): expect longer"
    return Estimate(seconds, step_s, steps, rounds, setup, basis)


# --------------------------------------------------------------------------------------------- results
def _suffix(metric: str) -> str:
    return "" if metric == "f1" else f"_{metric}"


def comparison_rows(
    records: Sequence[dict[str, Any]],
    base: Arm,
    arms: Sequence[Arm],
    metrics: Sequence[str],
    *,
    seeds_requested: Sequence[int],
    context: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant: for each metric delta_<m>, se_<m>, ci95_<m> (two-element list or None),
    resolvable_<m>, the verdict (`verdict` for F1, `verdict_<m>` for the others), and the means of base and
    variant over the shared seeds. A seed counts once base and variant both finished it."""
    by_arch: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_arch.setdefault(r["arch"], {})[int(r["seed"])] = r
    base_runs = by_arch.get(base.arch, {})
    arm_archs = [base.arch, *(a.arch for a in arms)]
    finished = sorted(s for s in seeds_requested if all(s in by_arch.get(a, {}) for a in arm_archs))
    rows = []
    for arm in arms:
        runs = by_arch.get(arm.arch, {})
        shared = sorted(set(base_runs) & set(runs))
        row: dict[str, Any] = {
            "kind": "comparison",
            "variant": arm.text,
            "arch": arm.arch,
            "base": base.text,
            "base_arch": base.arch,
            **(context or {}),
            "n_seeds": len(shared),
            "seeds": shared,
            "seeds_requested": len(seeds_requested),
            "seeds_finished": len(finished),
            "partial": len(finished) < len(seeds_requested),
        }
        if arm.spec is not None:
            row["overrides"] = dict(arm.spec.overrides)
        for m in metrics:
            b = {s: v for s in shared if (v := metric_value(base_runs[s], m)) is not None}
            v = {s: x for s in shared if (x := metric_value(runs[s], m)) is not None}
            both = sorted(set(b) & set(v))
            sfx = _suffix(m)
            if not both:
                row.update(
                    {
                        f"delta_{m}": None,
                        f"se_{m}": None,
                        f"ci95_{m}": None,
                        f"resolvable_{m}": None,
                        f"verdict{sfx}": "unresolved",
                        f"{m}_base": None,
                        f"{m}_variant": None,
                    }
                )
                continue
            direction = metric_direction(m)
            d = paired_delta(b, v, m, higher_is_better=direction is not False)
            verdict: str = d.verdict
            if direction is None:  # no better side (L0): say which way it moved
                verdict = {"better": "higher", "worse": "lower"}.get(verdict, verdict)
            row.update(
                {
                    f"delta_{m}": d.delta,
                    f"se_{m}": d.se,
                    f"ci95_{m}": list(d.ci95) if d.ci95 else None,
                    f"resolvable_{m}": d.resolvable,
                    f"verdict{sfx}": verdict,
                    f"{m}_base": statistics.fmean(b[s] for s in both),
                    f"{m}_variant": statistics.fmean(v[s] for s in both),
                }
            )
        rows.append(row)
    return rows


@dataclass
class CompareOutcome:
    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    base: Arm
    arms: list[Arm]
    seeds_finished: int
    seeds_requested: int
    wall_seconds: float
    estimate: Estimate | None = None

    @property
    def partial(self) -> bool:
        return self.seeds_finished < self.seeds_requested


def run_compare(
    request: CompareRequest,
    *,
    store: Any = None,
    estimate: bool = True,
    progress: bool = False,
    on_estimate: Callable[[Estimate], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    resolved: tuple[Arm, list[Arm]] | None = None,
) -> CompareOutcome:
    """Train base and variants on every seed, then compare them paired by seed (see the module docstring)."""
    started = time.monotonic()
    base, arms = resolved or resolve_arms(request)
    bench = bench_request(request, base, arms)
    est = None
    if estimate:
        workers = request.max_minutes is not None or (request.jobs > 1 and len(request.seeds) > 1)
        est = estimate_wall_time(bench, request.jobs, workers=workers)
        if on_estimate:
            on_estimate(est)
    max_seconds = None
    if request.max_minutes is not None:
        # The budget counts from the start, the estimate's probe included.
        max_seconds = max(1e-3, request.max_minutes * 60 - (time.monotonic() - started))
    stamp = reserve_run_dirs(bench)
    records = run_bench(
        bench,
        store=store,
        progress=progress,
        on_result=on_result,
        jobs=request.jobs,
        stamp=stamp,
        max_seconds=max_seconds,
    )
    assert request.l0 is not None
    context = {
        "protocol": request.protocol.name,
        "samples": request.samples,
        "tier": request.tier,
        "l0_target": float(request.l0),
    }
    rows = comparison_rows(records, base, arms, request.metrics, seeds_requested=request.seeds, context=context)
    arm_archs = [base.arch, *(a.arch for a in arms)]
    finished = sum(
        all(any(r["arch"] == a and r["seed"] == s for r in records) for a in arm_archs) for s in request.seeds
    )
    return CompareOutcome(
        rows=rows,
        records=records,
        base=base,
        arms=arms,
        seeds_finished=finished,
        seeds_requested=len(request.seeds),
        wall_seconds=time.monotonic() - started,
        estimate=est,
    )
