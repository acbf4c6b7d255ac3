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
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run the request; returns one record per (arch, L0, seed).

    `jobs` > 1 trains that many seeds at once in worker processes, each with its share of the CPU
    threads (on a 2-core CPU two single-threaded seeds beat one two-threaded seed by ~1.6×). Every
    worker writes its own results into the same store (SQLite in WAL mode takes concurrent writers)."""
    require(isinstance(jobs, int) and jobs >= 1, "jobs", jobs, "must be a positive integer")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jobs == 1 or len(request.seeds) == 1:
        model = load_data(request.protocol.data, device=request.device)
        records: list[dict[str, Any]] = []
        for seed in request.seeds:
            records += run_seed(request, seed, stamp, model=model, store=store, progress=progress, on_result=on_result)
        return records
    return _run_seeds_in_workers(request, stamp, store, on_result, jobs)


def run_seed(
    request: BenchRequest,
    seed: int,
    stamp: str,
    model: Any = None,
    store: Any = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (arch, L0) of one seed, trained together on one stream; each result recorded as it lands."""
    if model is None:
        model = load_data(request.protocol.data, device=request.device)
    cfg = request.run_config(seed)
    run_dir = request.out_dir / f"{request.protocol.name}-{stamp}-seed{seed}"
    env = envelope({"protocol": request.protocol.to_dict(), "run": dataclasses.asdict(cfg)}, request.device)
    run_ids: dict[str, Any] = {}
    if store is not None:
        for name, arch, l0 in cfg.sae_names():
            run_ids[name] = store.start_run(request.protocol.name, arch, l0, seed, env)
    seed_started = time.perf_counter()
    records: list[dict[str, Any]] = []

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
            done = {r["name"] for r in records}
            for name, run_id in run_ids.items():
                if name not in done:
                    store.fail_run(run_id, f"{type(err).__name__}: {err}")
        raise
    return records


def _worker_run_seed(request: BenchRequest, seed: int, stamp: str, store_path: str | None, threads: int):
    import torch

    torch.set_num_threads(threads)
    store = None
    if store_path is not None:
        from saelab.bench.store import ResultsStore

        store = ResultsStore(store_path)
    return run_seed(request, seed, stamp, store=store, progress=False)


def _run_seeds_in_workers(request, stamp, store, on_result, jobs) -> list[dict[str, Any]]:
    import concurrent.futures as cf
    import multiprocessing
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs) if request.device == "cpu" else torch.get_num_threads()
    store_path = str(store.path) if store is not None else None
    records: list[dict[str, Any]] = []
    # spawn, not fork: a forked child inherits the parent's OpenMP pool and torch state.
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker_run_seed, request, seed, stamp, store_path, threads) for seed in request.seeds]
        try:
            for future in cf.as_completed(futures):
                for record in future.result():
                    records.append(record)
                    if on_result:
                        on_result(record)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    records.sort(key=lambda r: (r["seed"], r["name"]))
    return records
