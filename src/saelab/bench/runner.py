"""The benchmark runner: every (arch, L0, seed) of a protocol, one shared data stream per seed.

For each seed all (arch, L0) SAEs train together on the same batches (data is paid for once),
are scored against the ground truth, and each result goes into the results store with its
envelope. A run that dies part-way stays "running" in the store and is reported as incomplete.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from saelab.bench.protocols import Protocol
from saelab.errors import require
from saelab.provenance import envelope
from saelab.training.run import RunConfig, load_data, run_training

SUMMARY_METRICS = ("f1", "precision", "recall", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")


@dataclass
class BenchRequest:
    protocol: Protocol
    archs: list[str]
    l0s: list[float]
    seeds: list[int]
    device: str = "cpu"
    samples: int | None = None  # override the protocol's budget (convergence checks)
    arch_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: Path = Path("runs/bench")

    def __post_init__(self) -> None:
        require(len(self.archs) > 0, "arch", self.archs, "name at least one architecture")
        require(len(self.seeds) > 0, "seeds", self.seeds, "need at least one seed")

    def run_config(self, seed: int) -> RunConfig:
        p = self.protocol
        options = {arch: {**p.arch_options.get(arch, {}), **self.arch_options.get(arch, {})} for arch in self.archs}
        return RunConfig(
            data=p.data,
            arch=self.archs,
            l0=self.l0s,
            width=p.width,
            samples=self.samples or p.samples,
            batch_size=p.batch_size,
            lr=p.lr,
            lr_decay_fraction=p.lr_decay_fraction,
            lr_warmup_steps=p.lr_warmup_steps,
            seed=seed,
            eval_samples=p.eval_samples,
            device=self.device,
            autocast_bf16=p.autocast_bf16 and self.device.startswith("cuda"),
            dead_feature_window=p.dead_feature_window,
            arch_options={k: v for k, v in options.items() if v},
        )


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd over seeds for each (arch, L0)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["arch"], r["l0_target"]), []).append(r)
    rows = []
    for (arch, l0), rs in groups.items():
        row: dict[str, Any] = {"arch": arch, "l0_target": l0, "n_seeds": len(rs), "summary": True}
        for key in SUMMARY_METRICS + ("wall_seconds",):
            values = [float(r[key]) for r in rs if r.get(key) is not None]
            if values:
                row[f"{key}_mean"] = statistics.fmean(values)
                row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    rows.sort(key=lambda r: -r.get("f1_mean", 0.0))
    return rows


def run_bench(
    request: BenchRequest,
    store: Any = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the request; returns one record per (arch, L0, seed)."""
    model = load_data(request.protocol.data, device=request.device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    records: list[dict[str, Any]] = []
    for seed in request.seeds:
        cfg = request.run_config(seed)
        run_dir = request.out_dir / f"{request.protocol.name}-{stamp}-seed{seed}"
        env = envelope({"protocol": request.protocol.to_dict(), "run": dataclasses.asdict(cfg)}, request.device)
        run_ids: dict[str, Any] = {}
        if store is not None:
            for name, arch, l0 in cfg.sae_names():
                run_ids[name] = store.start_run(request.protocol.name, arch, l0, seed, env)
        seed_started = time.perf_counter()

        def record_result(record: dict[str, Any]) -> None:
            record = {**record, "protocol": request.protocol.name,
                      "wall_seconds": time.perf_counter() - seed_started, "run_dir": str(run_dir)}
            record.pop("train_stats", None)
            if store is not None:
                store.finish_run(run_ids[record["name"]], record, record["wall_seconds"])
            records.append(record)
            if on_result:
                on_result(record)

        try:
            run_training(cfg, run_dir, progress=progress, model=model, on_result=record_result)
        except BaseException as err:
            if store is not None and not isinstance(err, KeyboardInterrupt):
                done = {r["name"] for r in records if r["seed"] == seed}
                for name, run_id in run_ids.items():
                    if name not in done:
                        store.fail_run(run_id, f"{type(err).__name__}: {err}")
            raise
    return records
