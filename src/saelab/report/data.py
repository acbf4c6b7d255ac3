"""What a report is made from: a run folder (`run.json` + `saes/`) or a results store (SQLite), read and checked.

`load_report_source(path)` decides which one `path` is and returns a `ReportSource`: one `SAEEntry` per SAE
(its metrics and, where it is on disk, its SAELens folder), the leaderboard rows, the envelope(s), the training
history and everything that makes the source *partial* (a run killed mid-way, store rows that never finished,
SAE folders that are gone). Bad input — a missing path, an empty folder or store, a `run.json` that is not
valid JSON, lacks envelope keys or comes from an incompatible saelab — raises FileFormatError/ConfigError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab import __version__
from saelab.errors import ConfigError, FileFormatError
from saelab.metrics.names import ground_truth_keys

# Keys every run.json written by `run_training` carries (the provenance envelope).
ENVELOPE_KEYS = ("config", "saelab_version", "commit", "hardware", "time")
# run.json files carry no format number of their own yet; this is the one they implicitly have.
RUN_FORMAT_VERSION = 1
_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass
class SAEEntry:
    """One trained SAE: who it is, what it scored, where its weights are (None when not on disk)."""

    name: str
    arch: str
    l0_target: float
    seed: int
    metrics: dict[str, Any]
    folder: Path | None
    protocol: str = "run"
    data: str | None = None
    run_dir: Path | None = None
    width: int | None = None
    missing_reason: str | None = None  # why `folder` is None
    samples: int | None = None  # training budget (a run of another budget is another entry)
    protocol_samples: int | None = None  # the budget of the protocol it was benched under (None: a plain run)
    run_config: dict[str, Any] = field(default_factory=dict)  # the RunConfig it was trained with, as recorded

    @property
    def has_ground_truth(self) -> bool:
        return any(self.metrics.get(k) is not None for k in ground_truth_keys())


@dataclass
class ReportSource:
    kind: str  # "run" or "store"
    path: Path
    entries: list[SAEEntry]
    leaderboard: list[dict[str, Any]]
    envelope: dict[str, Any]  # config, saelab_version, commit, hardware, time (+ wall_seconds, status)
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # human-readable reasons; empty = complete
    notes: list[str] = field(default_factory=list)
    store_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def has_ground_truth(self) -> bool:
        return any(e.has_ground_truth for e in self.entries)

    @property
    def data(self) -> str | None:
        return self.data_and_reason()[0]

    @property
    def run_config(self) -> dict[str, Any]:
        cfg = self.envelope.get("config") or {}
        if isinstance(cfg, dict) and isinstance(cfg.get("run"), dict):  # a bench envelope
            cfg = cfg["run"]
        return cfg if isinstance(cfg, dict) else {}

    def data_and_reason(self) -> tuple[str | None, str | None]:
        """The data to re-evaluate on (None with the reason when it cannot be rebuilt)."""
        for e in self.entries:
            if e.data:
                return e.data, None
        return data_of(self.run_config)


def data_of(cfg: Any) -> tuple[str | None, str | None]:
    """(data spec the report can rebuild, or None with the reason) from a run config.

    Runs on real-model activations name a model, an activation cache or activation files; `data` then holds a
    default that was never used. Activation files can be read back; a model or cache is not re-run here."""
    if not isinstance(cfg, dict):
        return None, "the run config is missing"
    files = cfg.get("activations") or []
    if isinstance(files, str):
        files = [files]
    if files:
        return str(files[0]), None
    if cfg.get("cache"):
        return str(cfg["cache"]), None  # `resolve_data` reads a `saelab cache` folder
    if cfg.get("model"):
        return None, f"the run trained on real-model activations (model {cfg['model']})"
    data = cfg.get("data")
    return (str(data), None) if data else (None, "the run config does not name its data")


def _parse_version(text: Any) -> tuple[int, ...] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def check_version(saelab_version: Any, where: str) -> None:
    """A file written by a saelab whose major version differs from ours has a layout we cannot promise to read."""
    theirs, ours = _parse_version(saelab_version), _parse_version(__version__)
    if theirs is None:
        raise FileFormatError(
            f"{where}: saelab_version={saelab_version!r} is not a version number; not a file written by saelab"
        )
    if ours is not None and theirs[0] != ours[0]:
        raise FileFormatError(
            f"{where} was written by saelab {saelab_version}, incompatible with this saelab "
            f"{__version__} (major version {theirs[0]} ≠ {ours[0]}); report it with a matching saelab"
        )


def load_report_source(path: str | Path) -> ReportSource:
    """A run folder or a results store, validated (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileFormatError(
            f"{path} does not exist: give a run folder (run.json + saes/) or a results store (.sqlite)"
        )
    if path.is_dir():
        if (path / "run.json").exists():
            return load_run_folder(path)
        if not any(path.iterdir()):
            raise FileFormatError(f"{path} is an empty folder: not a run folder (no run.json)")
        raise FileFormatError(
            f"{path} has no run.json: not a run folder (give the folder `saelab train` or "
            "`saelab bench` wrote, or a results store)"
        )
    if path.stat().st_size == 0:
        raise FileFormatError(f"{path} is an empty file: not a results store")
    if path.name == "run.json":
        return load_run_folder(path.parent)
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head != _SQLITE_HEADER:
        raise FileFormatError(f"{path} is neither a run folder nor a saelab results store (not an SQLite file)")
    return load_store(path)


# ------------------------------------------------------------------------------------------------- run folder
def read_run_json(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run.json"
    try:
        text = p.read_text()
    except OSError as err:
        raise FileFormatError(f"cannot read {p}: {err.strerror or err}") from None
    if not text.strip():
        raise FileFormatError(f"{p} is empty: the run wrote nothing yet")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{p} is not valid JSON (truncated?): {err}") from None
    if not isinstance(record, dict):
        raise FileFormatError(f"{p} must hold a JSON object, got {type(record).__name__}")
    missing = [k for k in ENVELOPE_KEYS if k not in record]
    if missing:
        raise FileFormatError(f"{p} lacks the envelope key(s) {', '.join(missing)}: not a run.json written by saelab")
    fmt = record.get("format_version", RUN_FORMAT_VERSION)
    if fmt != RUN_FORMAT_VERSION:
        raise FileFormatError(
            f"{p}: format_version={fmt!r} is not one this saelab {__version__} reads "
            f"({RUN_FORMAT_VERSION}); report it with a matching saelab"
        )
    check_version(record["saelab_version"], str(p))
    if not isinstance(record["config"], dict):
        raise FileFormatError(f"{p}: config must be an object, got {type(record['config']).__name__}")
    status = record.get("status", "complete")
    if status not in ("running", "complete"):
        raise ConfigError("status", status, f"in {p} must be running or complete")
    for key in ("results", "history"):
        if key in record and not isinstance(record[key], list):
            raise FileFormatError(f"{p}: {key} must be a list, got {type(record[key]).__name__}")
    return record


def _sae_names_from_config(cfg: dict[str, Any]) -> list[tuple[str, str, float]]:
    from saelab.saes.registry import arch_label

    archs, l0s = cfg.get("arch") or [], cfg.get("l0") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(l0s, list):
        l0s = [l0s]
    out = []
    for arch in archs:
        for l0 in l0s:
            try:
                out.append((f"{arch_label(str(arch))}-l0_{float(l0):g}", str(arch), float(l0)))
            except (TypeError, ValueError):
                raise FileFormatError(f"run.json config: l0={l0!r} is not a number") from None
    return out


def load_run_folder(run_dir: Path) -> ReportSource:
    record = read_run_json(run_dir)
    cfg = record["config"]
    status = record.get("status", "complete")
    partial: list[str] = []
    if status in ("running", "interrupted", "diverged"):
        has_ckpt = (run_dir / "checkpoint" / "checkpoint.json").exists()
        said = {
            "running": "is still running: it was killed mid-way or is in progress",
            "interrupted": "was interrupted (SIGINT/SIGTERM)",
            "diverged": "diverged",
        }[status]
        partial.append(
            f"run.json says the run {said} "
            f"({'a checkpoint exists' if has_ckpt else 'no checkpoint'}); "
            "only what it saved is shown"
        )
    results: dict[Any, dict[str, Any]] = {r.get("name"): r for r in record.get("results", []) if isinstance(r, dict)}
    expected = _sae_names_from_config(cfg)
    saes_dir = run_dir / "saes"
    entries = []
    for name, arch, l0 in expected or [
        (n, str(r.get("arch")), float(r.get("l0_target", 0))) for n, r in results.items()
    ]:
        folder = saes_dir / name
        reason = None
        if not (folder / "cfg.json").exists():
            reason = f"{folder} is missing"
            folder = None
        metrics = dict(results.get(name, {}))
        if folder is None and not metrics:
            if status == "complete":
                partial.append(f"SAE {name} is listed in the config but has neither results nor a saved folder")
            continue
        if folder is None and status == "complete":
            partial.append(f"SAE {name}: {reason}; its per-feature sections are omitted")
        entries.append(
            SAEEntry(
                name=name,
                arch=arch,
                l0_target=l0,
                seed=int(cfg.get("seed", 0) or 0),
                metrics=metrics,
                folder=folder,
                data=data_of(cfg)[0],
                run_dir=run_dir,
                width=cfg.get("width"),
                missing_reason=reason,
                samples=_int_or_none(cfg.get("samples")),
                run_config=cfg,
            )
        )
    if status == "running" and not entries:
        partial.append("no SAE of this run was saved before it stopped")
    envelope = {k: record.get(k) for k in (*ENVELOPE_KEYS, "config_hash", "wall_seconds", "train_samples_per_second")}
    envelope["status"] = status
    board = _run_leaderboard(entries)
    history = [h for h in record.get("history", []) if isinstance(h, dict)]
    return ReportSource(
        kind="run",
        path=run_dir,
        entries=entries,
        leaderboard=board,
        envelope=envelope,
        history=history,
        partial=partial,
    )


def _run_leaderboard(entries: list[SAEEntry]) -> list[dict[str, Any]]:
    from saelab.bench.leaderboard import LEADERBOARD_METRICS, is_transcoder_row, with_transcoder_metrics
    from saelab.bench.reference import reference_rows
    from saelab.bench.store import sort_leaderboard, summary

    rows = []
    for e in entries:
        if not e.metrics:
            continue
        stats = summary([e.metrics], with_transcoder_metrics([e.metrics], LEADERBOARD_METRICS))
        rows.append(
            {
                "source": "saelab",
                "protocol": e.protocol,
                "arch": e.arch,
                "l0_target": e.l0_target,
                "samples": e.samples,
                "n_seeds": stats.pop("n"),
                **stats,
                "citation": None,
                "note": e.name,
            }
        )
    # The published SynthSAEBench rows are SAE baselines: a run of transcoders alone gets none.
    sae_run = not rows or not all(map(is_transcoder_row, rows))
    return sort_leaderboard(rows + (reference_rows(None) if sae_run else []))


def _run_config_hash(cfg: Any) -> str | None:
    """`config_hash` of the run config inside a bench envelope {"protocol": ..., "run": ...}: run.json's hash."""
    from saelab.provenance import config_hash

    run = cfg.get("run") if isinstance(cfg, dict) else None
    return config_hash(run) if isinstance(run, dict) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- store
def _resolve_run_dir(run_dir: Any, store_path: Path) -> Path | None:
    """A store keeps run folders as the bench process saw them (often relative to its working directory)."""
    if not run_dir:
        return None
    p = Path(str(run_dir)).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, store_path.parent / p, store_path.parent.parent / p]
    for c in candidates:
        if (c / "run.json").exists() or (c / "saes").is_dir():
            return c
    return None


def load_store(path: Path) -> ReportSource:
    from saelab.bench.store import ResultsStore
    from saelab.saes.registry import arch_label

    store = ResultsStore(path, create=False)
    runs = store.runs()
    if not runs:
        raise FileFormatError(f"{path} is an empty results store (no runs recorded): run `saelab bench` first")
    for run in runs:
        check_version(run.get("saelab_version"), f"{path} run {run['run_id']}")
    partial = []
    unfinished = [r for r in runs if r["status"] != "complete"]
    for r in unfinished:
        why = {
            "running": "still running",
            "incomplete": "its process died before it finished",
            "failed": f"failed: {r.get('error') or 'no error recorded'}",
        }.get(r["status"], r["status"])
        partial.append(
            f"run {r['run_id']} ({r['protocol']} {r['arch']} L0 {r['l0_target']:g} seed {r['seed']}) "
            f"is {r['status']}: {why}"
        )
    # the latest complete run of each (protocol, arch, L0, budget, precision, seed), as the leaderboard counts them: a run
    # on another budget is its own entry, never a replacement (bench.leaderboard.group_key)
    from saelab.bench.leaderboard import budget_of, latest_complete_runs, protocol_budget_of

    latest = latest_complete_runs(runs)
    entries = []
    for r in latest.values():
        metrics = dict(r.get("metrics") or {})
        name = metrics.get("name") or f"{arch_label(str(r['arch']))}-l0_{r['l0_target']:g}"
        cfg = r.get("config") or {}
        run_cfg = cfg.get("run", cfg) if isinstance(cfg, dict) else {}
        run_dir = _resolve_run_dir(metrics.get("run_dir"), path)
        folder, reason = None, None
        if run_dir is None:
            reason = (
                f"its run folder {metrics.get('run_dir')} is not on this machine"
                if metrics.get("run_dir")
                else "the store records no run folder for it"
            )
        elif not (run_dir / "saes" / name / "cfg.json").exists():
            reason = f"{run_dir / 'saes' / name} is missing"
        else:
            folder = run_dir / "saes" / name
        entries.append(
            SAEEntry(
                name=name,
                arch=r["arch"],
                l0_target=float(r["l0_target"]),
                seed=int(r["seed"]),
                metrics={**metrics, "wall_seconds": r.get("wall_seconds"), "run_id": r["run_id"]},
                folder=folder,
                protocol=r["protocol"],
                data=data_of(run_cfg)[0],
                run_dir=run_dir,
                width=run_cfg.get("width"),
                missing_reason=reason,
                samples=budget_of(r),
                protocol_samples=protocol_budget_of(r),
                run_config=run_cfg if isinstance(run_cfg, dict) else {},
            )
        )
    # The published SynthSAEBench rows are SAE baselines: a store of transcoders alone gets none.
    from saelab.bench.leaderboard import is_transcoder_row

    board = store.leaderboard(None, include_reference=not latest or not all(map(is_transcoder_row, latest.values())))
    # provenance and training curves come from the best run (the latest one when nothing completed)
    best = max(entries, key=lambda e: (e.metrics.get("f1") or -1.0, e.folder is not None), default=None)
    best_run = runs[-1] if best is None else next(r for r in runs if r["run_id"] == best.metrics["run_id"])
    envelope = {
        "config": best_run.get("config"),
        "saelab_version": best_run.get("saelab_version"),
        "commit": best_run.get("commit"),
        "hardware": best_run.get("hardware"),
        "time": best_run.get("started_at"),
        # the run config's hash, as the run folder's run.json records it; the store's own hash also covers the
        # protocol's defaults (`bench_config_hash`), so it differs for the same run
        "config_hash": _run_config_hash(best_run.get("config")),
        "bench_config_hash": best_run.get("config_hash"),
        "wall_seconds": best_run.get("wall_seconds"),
        "status": best_run.get("status"),
        "run_id": best_run.get("run_id"),
    }
    history: list[dict[str, Any]] = []
    if best is not None and best.run_dir is not None and (best.run_dir / "run.json").exists():
        try:
            history = [h for h in read_run_json(best.run_dir).get("history", []) if isinstance(h, dict)]
        except (FileFormatError, ConfigError):
            history = []
    started = sorted(r["started_at"] for r in runs if r.get("started_at"))
    store_summary = {
        "runs": len(runs),
        "complete": len(runs) - len(unfinished),
        "protocols": sorted({r["protocol"] for r in runs}),
        "first_started": started[0] if started else None,
        "last_started": started[-1] if started else None,
        "total_wall_seconds": sum(float(r.get("wall_seconds") or 0.0) for r in runs),
        "best_run_dir": str(best.run_dir) if best is not None and best.run_dir else None,
    }
    if not entries:
        partial.append("the store has no complete run: nothing of saelab's own to rank or plot")
    return ReportSource(
        kind="store",
        path=path,
        entries=entries,
        leaderboard=board,
        envelope=envelope,
        history=history,
        partial=partial,
        store_summary=store_summary,
    )
