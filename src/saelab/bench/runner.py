"""The benchmark runner: every (arch, L0, seed) of a protocol, one shared data stream per seed.

For each seed all (arch, L0) SAEs train together on the same batches (data is paid for once),
are scored against the ground truth, and each result goes into the results store with its
envelope. A run that dies part-way stays "running" in the store and is reported as incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.bench.protocols import Protocol
from saelab.bench.variants import VariantSpec, register_variants
from saelab.errors import TrainingInterrupted, require
from saelab.provenance import envelope
from saelab.runs import RunConfig, run_training
from saelab.synthetic import load_source as load_data
from saelab.training.progress import progress_label

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
    eval_samples: int | None = None  # override the protocol's evaluation samples
    precision: str | None = None  # override the protocol's precision (auto, fp32, bf16)
    checkpoint_minutes: float = 10.0  # wall time between checkpoints of each seed's run (what --resume continues)
    checkpoint_every: int = 0  # steps between checkpoints (0: by time only)
    resume: bool = False  # continue the run folders of `stamp` (see find_resumable_stamp) instead of starting
    # Override variants (`recipe:ista_steps=0`) among archs: spawned workers register them again.
    variants: list[VariantSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(len(self.archs) > 0, "arch", self.archs, "name at least one architecture")
        require(len(self.seeds) > 0, "seeds", self.seeds, "need at least one seed")
        require(
            self.eval_samples is None or (isinstance(self.eval_samples, int) and self.eval_samples > 0),
            "eval_samples",
            self.eval_samples,
            "must be a positive integer",
        )

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
            eval_samples=self.eval_samples or p.eval_samples,
            device=self.device,
            precision=self.precision or p.precision,
            dead_feature_window=p.dead_feature_window,
            transcoder=p.transcoder,
            checkpoint_minutes=self.checkpoint_minutes,
            checkpoint_every=self.checkpoint_every,
            arch_options={k: v for k, v in options.items() if v},
        )


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arch, L0, budget) over seeds: mean, sd, se and 95% interval (bench.leaderboard)."""
    from saelab.bench.leaderboard import summarize_seeds, with_transcoder_metrics

    rows = summarize_seeds(results, with_transcoder_metrics(results, SUMMARY_METRICS) + ("wall_seconds",))
    return [{"kind": "summary", "summary": True, **row} for row in rows]


def run_bench(
    request: BenchRequest,
    store: Any = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    jobs: int = 1,
    stamp: str | None = None,
    max_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """Run the request; returns one record per (arch, L0, seed).

    `max_seconds`: a wall-time budget. Seeds then always train in worker processes; when the budget is spent,
    the workers still training are stopped (SIGTERM: each saves a checkpoint and exits) and the records of the
    seeds that finished are returned. Compare the records with `request.seeds` to tell a partial result.

    `jobs` > 1 trains that many seeds at once in worker processes, each with its share of the CPU
    threads (on a 2-core CPU two single-threaded seeds beat one two-threaded seed by ~1.6×). Every
    worker writes its own results into the same store (SQLite in WAL mode takes concurrent writers).
    Workers die with this process; on KeyboardInterrupt (Ctrl-C, or `workers.Terminated`) they are stopped
    at once and the interrupt propagates (a signal during training in this process arrives as the trainer's
    TrainingInterrupted). `stamp` names run folders already made by `reserve_run_dirs`. `progress`: the trainer's
    bar on a terminal, else a plain line every so often (training/progress.py); workers print plain lines
    labelled with their seed."""
    require(
        isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1, "jobs", jobs, "must be a positive integer"
    )
    require(
        max_seconds is None or max_seconds > 0,
        "max_minutes",
        None if max_seconds is None else max_seconds / 60,
        "must be a positive number of minutes",
    )
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    if stamp is None:
        stamp = reserve_run_dirs(request)
    try:
        if deadline is None and (jobs == 1 or len(request.seeds) == 1):
            model = load_data(request.protocol.data, device=request.device)
            records: list[dict[str, Any]] = []
            for seed in request.seeds:
                records += run_seed(
                    request, seed, stamp, model=model, store=store, progress=progress, on_result=on_result
                )
            return records
        return _run_seeds_in_workers(request, stamp, store, on_result, jobs, deadline, progress)
    finally:
        for seed in request.seeds:  # seeds that never started (interrupted, failed) leave no empty folder
            with contextlib.suppress(OSError):
                run_dir_for(request, stamp, seed).rmdir()


def seed_state(run_dir: Path) -> str:
    """Where one seed's run folder stands: "complete", "checkpoint" (can continue) or "new" (start it over)."""
    from saelab.io import read_json
    from saelab.runs.run import CHECKPOINT_DIR
    from saelab.training import checkpoint as ckpt_io

    run_json = run_dir / "run.json"
    if run_json.exists() and read_json(run_json).get("status") == "complete":
        return "complete"
    if (run_dir / CHECKPOINT_DIR / ckpt_io.JSON_NAME).exists():
        return "checkpoint"
    return "new"


def finished_records(request: BenchRequest, seed: int, run_dir: Path) -> list[dict[str, Any]]:
    """The records of a seed that completed before a `--resume` (recorded in the store when they finished)."""
    from saelab.io import read_json

    saved = read_json(run_dir / "run.json")
    cfg = request.run_config(seed)
    return [
        bench_record(request, cfg, record, saved.get("wall_seconds"), run_dir) for record in saved.get("results", [])
    ]


def bench_record(
    request: BenchRequest, cfg: RunConfig, record: dict[str, Any], wall_seconds: float | None, run_dir: Path
) -> dict[str, Any]:
    """A run's result record as bench stores and prints it: the protocol and budgets added, training stats dropped."""
    return {
        **{k: v for k, v in record.items() if k != "train_stats"},
        "protocol": request.protocol.name,
        "samples": cfg.samples,
        "protocol_samples": request.protocol.samples,
        "eval_samples": cfg.eval_samples,
        "wall_seconds": wall_seconds,
        "run_dir": str(run_dir),
    }


def find_resumable_stamp(request: BenchRequest) -> str:
    """The stamp of the newest bench under `request.out_dir` whose run folders hold these very settings.

    A seed folder counts when its run.json (or checkpoint) records the run config this request gives that
    seed; `--resume` may change only what cannot change the weights (eval samples, device, checkpoint cadence).
    Raises ConfigError naming the folder and the first differing setting when nothing matches."""
    import re

    from saelab.errors import ConfigError, SaelabError
    from saelab.io import read_json
    from saelab.runs.run import check_resume_config

    pattern = re.compile(rf"^{re.escape(request.protocol.name)}-(.+)-seed(\d+)$")
    stamps: dict[str, float] = {}
    for folder in request.out_dir.glob(f"{request.protocol.name}-*-seed*"):
        m = pattern.match(folder.name)
        if m and folder.is_dir() and (folder / "run.json").exists():
            stamps[m.group(1)] = max(stamps.get(m.group(1), 0.0), (folder / "run.json").stat().st_mtime)
    first_refusal: str | None = None
    for stamp in sorted(stamps, key=lambda st: stamps[st], reverse=True):
        try:
            for seed in request.seeds:
                run_json = run_dir_for(request, stamp, seed) / "run.json"
                if run_json.exists():
                    check_resume_config(read_json(run_json).get("config"), request.run_config(seed), run_json)
        except SaelabError as err:
            first_refusal = first_refusal or f"{run_dir_for(request, stamp, request.seeds[0]).parent}/…{stamp}: {err}"
            continue
        return stamp  # the newest bench with these settings (all seeds complete: nothing left to train)
    detail = f"; the newest candidate differs: {first_refusal}" if first_refusal else ""
    raise ConfigError(
        "resume",
        str(request.out_dir),
        f"holds no interrupted `{request.protocol.name}` bench with these settings to continue{detail}; "
        "run the same bench command that was interrupted (same --arch, --l0, --seeds, budget), or drop --resume",
    )


def run_dir_for(request: BenchRequest, stamp: str, seed: int) -> Path:
    return request.out_dir / f"{request.protocol.name}-{stamp}-seed{seed}"


def reserve_run_dirs(request: BenchRequest) -> str:
    """Create this bench's (empty) run folders under a stamp no other bench can share; returns the stamp."""
    from saelab.bench.paths import make_unique_run_dirs

    return make_unique_run_dirs(request.out_dir, request.protocol.name, [f"-seed{s}" for s in request.seeds])


def finished_runs(
    request: BenchRequest, stamp: str, store: Any = None, records: list[dict[str, Any]] | None = None
) -> list[tuple[str, float, int]]:
    """(arch, L0 target, seed) of this bench's runs that completed: from the store where there is one (workers
    record each result there as it lands), else from the records the caller collected."""
    done: set[tuple[str, float, int]] = set()
    if store is not None:
        mine = {str(run_dir_for(request, stamp, s)) for s in request.seeds}
        try:
            for row in store.runs(protocol=request.protocol.name, status="complete"):
                if (row.get("metrics") or {}).get("run_dir") in mine:
                    done.add((row["arch"], float(row["l0_target"]), int(row["seed"])))
        except Exception:  # noqa: BLE001  (reporting on the way out must not hide the interrupt)
            pass
    for r in records or []:
        done.add((r["arch"], float(r["l0_target"]), int(r["seed"])))
    return sorted(done, key=lambda t: (t[2], t[0], t[1]))


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
    register_variants(request.variants, **variant_check_dims(request))
    if model is None:
        model = load_data(request.protocol.data, device=request.device)
    cfg = request.run_config(seed)
    run_dir = run_dir_for(request, seed=seed, stamp=stamp)
    resume = False
    if request.resume:
        state = seed_state(run_dir)
        if state == "complete":
            done = finished_records(request, seed, run_dir)
            for record in done:
                if on_result:
                    on_result(record)
            return done
        resume = state == "checkpoint"
    env = envelope({"protocol": request.protocol.to_dict(), "run": dataclasses.asdict(cfg)}, request.device)
    run_ids: dict[str, Any] = {}
    if store is not None:
        for name, arch, l0 in cfg.sae_names():
            run_ids[name] = store.start_run(request.protocol.name, arch, l0, seed, env)
            if request.resume:
                store.mark_continued(request.protocol.name, arch, l0, seed, run_ids[name])
    seed_started = time.perf_counter()
    records: list[dict[str, Any]] = []

    def record_result(record: dict[str, Any]) -> None:
        record = bench_record(request, cfg, record, time.perf_counter() - seed_started, run_dir)
        if store is not None:
            store.finish_run(run_ids[record["name"]], record, record["wall_seconds"])
        records.append(record)
        if on_result:
            on_result(record)

    try:
        with progress_label(f"seed {seed}"):  # `seed 1: step ...` when seeds train side by side
            run_training(cfg, run_dir, resume=resume, progress=progress, model=model, on_result=record_result)
    except BaseException as err:
        # A signal (Ctrl-C, SIGTERM, the trainer's stop) leaves the unfinished runs "running": once this process
        # is gone they read as incomplete, which is what they are. Only real failures are marked failed.
        if store is not None and not isinstance(err, (KeyboardInterrupt, SystemExit, TrainingInterrupted)):
            done = {r["name"] for r in records}
            for name, run_id in run_ids.items():
                if name not in done:
                    store.fail_run(run_id, f"{type(err).__name__}: {err}")
        raise
    return records


def _worker_run_seed(
    request: BenchRequest, seed: int, stamp: str, store_path: str | None, threads: int, progress: bool = False
):
    import os

    import torch

    torch.set_num_threads(threads)
    store = None
    if store_path is not None:
        from saelab.bench.store import ResultsStore

        store = ResultsStore(store_path)
    try:
        # Workers share the parent's stderr, where live bars would overwrite each other: plain lines.
        with progress_label(f"seed {seed}", plain=True):
            return run_seed(request, seed, stamp, store=store, progress=progress)
    except (KeyboardInterrupt, SystemExit, TrainingInterrupted):
        # Stopped by a signal (the trainer saved a checkpoint first where it could): end the process now, or the
        # pool would keep it alive waiting for the next seed while the parent waits for it to exit.
        os._exit(1)


def variant_check_dims(request: BenchRequest) -> dict[str, Any]:
    """Shapes for a variant's dry-run config check: the protocol's width and first L0."""
    p = request.protocol
    return {
        "d_in": max(1, p.width // 4),
        "d_sae": p.width,
        "l0": float(request.l0s[0]),
        "total_steps": max(1, (request.samples or p.samples) // p.batch_size),
    }


def _run_seeds_in_workers(
    request, stamp, store, on_result, jobs, deadline=None, progress=False
) -> list[dict[str, Any]]:
    import concurrent.futures as cf
    import multiprocessing
    import os

    import torch

    from saelab.bench.workers import init_worker, stop_processes

    threads = max(1, (os.cpu_count() or 1) // jobs) if request.device == "cpu" else torch.get_num_threads()
    store_path = str(store.path) if store is not None else None
    records: list[dict[str, Any]] = []
    # spawn, not fork: a forked child inherits the parent's OpenMP pool and torch state. Workers are started from
    # this (main) thread by submit(), which is what their parent-death signal is tied to.
    pool = cf.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(os.getpid(),),
    )
    futures = []

    def stop_now() -> None:
        for f in futures:
            f.cancel()
        stop_processes(list((getattr(pool, "_processes", None) or {}).values()))
        pool.shutdown(wait=False, cancel_futures=True)

    try:
        futures = [
            pool.submit(_worker_run_seed, request, seed, stamp, store_path, threads, progress) for seed in request.seeds
        ]
        pending = set(futures)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            for future in done:
                for record in future.result():
                    records.append(record)
                    if on_result:
                        on_result(record)
            if pending and deadline is not None and time.monotonic() >= deadline:
                stop_now()  # the budget is spent: the seeds still training stop here (partial result)
                break
        else:
            pool.shutdown(wait=True)
        records.sort(key=lambda r: (r["seed"], r["name"]))
        return records
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: stop the workers now instead of waiting for their seeds to finish.
        stop_now()
        raise
    except BaseException:
        # A seed failed: the seeds already training finish and are recorded; the rest never start.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
