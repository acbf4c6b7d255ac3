"""The results store: every bench run as one row of an embedded SQLite database, plus leaderboard, exports and plots.

A run is written twice: `start_run` records it as "running" (with the pid and hostname of the process doing it),
`finish_run` or `fail_run` closes it. A process killed in between leaves a "running" row whose pid is gone; queries
report such rows as "incomplete", and only "complete" rows ever reach a leaderboard, a summary or an export.

Several bench processes may write one store at once: the database is in WAL mode, every write is a short
`BEGIN IMMEDIATE` transaction, and a busy timeout makes a writer wait for the lock instead of failing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import socket
import sqlite3
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from saelab import __version__
from saelab.bench.reference import reference_rows
from saelab.errors import ConfigError, FileFormatError
from saelab.io import atomic_path, write_text_atomic

SCHEMA_VERSION = 1
DEFAULT_STORE = Path("runs") / "results.sqlite"
STORE_ENV = "SAELAB_STORE"
STATUSES = ("running", "complete", "failed", "incomplete")
# Metrics that get their own (indexed) column; everything else lives in metrics_json.
INDEXED_METRICS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
LEADERBOARD_METRICS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
_SQLITE_HEADER = b"SQLite format 3\x00"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        protocol TEXT NOT NULL,
        arch TEXT NOT NULL,
        l0_target REAL NOT NULL,
        seed INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed', 'incomplete')),
        pid INTEGER,
        pid_start INTEGER,
        hostname TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        wall_seconds REAL,
        config_json TEXT NOT NULL,
        config_hash TEXT,
        saelab_version TEXT,
        "commit" TEXT,
        hardware_json TEXT,
        metrics_json TEXT,
        error TEXT,
        f1 REAL,
        mcc REAL,
        uniqueness REAL,
        explained_variance REAL,
        l0 REAL,
        dead_latents NUMERIC
    )""",
    "CREATE INDEX IF NOT EXISTS runs_group ON runs (protocol, arch, l0_target, seed)",
    "CREATE INDEX IF NOT EXISTS runs_status ON runs (status)",
    "CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at)",
    "CREATE INDEX IF NOT EXISTS runs_f1 ON runs (f1)",
    "CREATE INDEX IF NOT EXISTS runs_mcc ON runs (mcc)",
    "CREATE INDEX IF NOT EXISTS runs_ev ON runs (explained_variance)",
    "CREATE INDEX IF NOT EXISTS runs_l0 ON runs (l0)",
    "CREATE INDEX IF NOT EXISTS runs_dead ON runs (dead_latents)",
]


def default_store_path() -> Path:
    """$SAELAB_STORE if set, else runs/results.sqlite."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else DEFAULT_STORE


def _now() -> str:
    # One fixed UTC format, so started_at strings sort (and compare with `since`) as times.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _normalise_time(value: str | _dt.datetime, field: str = "since") -> str:
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ConfigError(field, value, "must be an ISO time such as 2026-05-01 or 2026-05-01T12:00") from None
    if not isinstance(value, _dt.datetime):
        raise ConfigError(field, value, "must be an ISO time string or a datetime")
    if value.tzinfo is None:  # naive times are taken as UTC, like the stored ones
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensor/numpy scalars become numbers, NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):  # a tensor/array with several elements
            pass
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return str(value)


def _number(value: Any) -> float | int | None:
    value = _clean(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_clean(value), sort_keys=True, allow_nan=False)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a Linux process, or None where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces, so split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int | None, pid_start: int | None) -> bool:
    if pid is None:
        return True  # nothing to check against: keep reporting it as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):  # exited but not yet reaped: it will never finish the run
            return False
        if pid_start is not None and start != pid_start:  # the pid now belongs to a different process
            return False
    return True


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set)):
        return list(value) or None
    return [value]


class ResultsStore:
    """A SQLite file of bench runs. `create=False` opens an existing store only (read commands use it)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, timeout: float = 60.0):
        self.path = Path(path).expanduser()
        self.timeout = float(timeout)
        self.hostname = socket.gethostname()
        if self.path.is_dir():
            raise ConfigError("store", str(self.path), "is a folder; give a file such as runs/results.sqlite")
        has_content = self.path.exists() and self.path.stat().st_size > 0
        if has_content:
            self._check_header()
        elif not create:
            raise FileFormatError(
                f"no results store at {self.path}: run `saelab bench` first, or point --store / ${STORE_ENV} at one")
        if create:
            self._check_writable()
        self._open_schema(create)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # ---------------------------------------------------------------- opening
    def _check_header(self) -> None:
        # Check the magic bytes ourselves, so SQLite never gets the chance to touch a file that is not a database.
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_HEADER))
        except OSError as err:
            raise FileFormatError(f"cannot read results store {self.path}: {err.strerror or err}") from None
        if head != _SQLITE_HEADER:
            raise FileFormatError(
                f"{self.path} is not a saelab results store (not an SQLite file); it was left untouched")

    def _check_writable(self) -> None:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError("store", str(self.path), f"cannot create its folder: {err.strerror or err}") from None
        # WAL mode creates -wal and -shm files beside the database, so the folder itself must be writable.
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("store", str(self.path), f"folder {parent} is not writable")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise ConfigError("store", str(self.path), "is read-only")

    def _raw_connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as err:
            raise ConfigError("store", str(self.path), f"cannot open: {err}") from None
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        con.execute("PRAGMA synchronous = FULL")  # results are few and precious: fsync every commit
        return con

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (safe across fork/threads); with write=True, one IMMEDIATE transaction."""
        con = self._raw_connect()
        try:
            if write:
                con.execute("BEGIN IMMEDIATE")  # take the write lock up front: no deadlock on lock upgrade
            yield con
            if write:
                con.execute("COMMIT")
        except sqlite3.DatabaseError as err:
            self._rollback(con)
            raise self._translate(err) from None
        except BaseException:
            self._rollback(con)
            raise
        finally:
            con.close()

    @staticmethod
    def _rollback(con: sqlite3.Connection) -> None:
        if con.in_transaction:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _translate(self, err: sqlite3.DatabaseError) -> Exception:
        text = str(err)
        if "not a database" in text or "malformed" in text:
            return FileFormatError(f"results store {self.path} is corrupt: {text}")
        if "readonly" in text or "unable to open" in text or "disk I/O" in text:
            return ConfigError("store", str(self.path), f"is not writable: {text}")
        if "locked" in text or "busy" in text:
            return ConfigError("store", str(self.path),
                               f"stayed locked by another writer for over {self.timeout:g} s: {text}")
        return err

    def _open_schema(self, create: bool) -> None:
        con = self._raw_connect()
        try:
            # Version and tables are read in one transaction: another process may be creating the schema right now.
            con.execute("BEGIN")
            version = self._check_version(con, create)
            con.execute("COMMIT")
            if version == 0:
                con.execute("BEGIN IMMEDIATE")
                if self._check_version(con, create) == 0:  # still empty now that we hold the write lock
                    for statement in _SCHEMA:
                        con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
            if create:
                self._ensure_wal(con)
        except sqlite3.DatabaseError as err:
            self._rollback(con)
            raise self._translate(err) from None
        except BaseException:
            self._rollback(con)
            raise
        finally:
            con.close()

    def _ensure_wal(self, con: sqlite3.Connection) -> None:
        """Switch to WAL (persistent; lets readers and one writer work at once). Checked on every writable open, so
        a creator killed before switching cannot leave the store in rollback mode for good."""
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        # SQLite answers "locked" at once, without the busy handler, while another connection holds the file open
        # in rollback mode, so wait by hand.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if con.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                    return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
            if time.monotonic() > deadline:
                raise ConfigError("store", str(self.path), f"could not switch to WAL mode within {self.timeout:g} s")
            time.sleep(0.01)

    def _check_version(self, con: sqlite3.Connection, create: bool) -> int:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables -= {"sqlite_sequence"}
        if version > SCHEMA_VERSION:
            raise FileFormatError(
                f"results store {self.path} has schema version {version}, newer than this saelab "
                f"{__version__} reads (up to {SCHEMA_VERSION}); upgrade saelab. The file was left untouched")
        if version == SCHEMA_VERSION and "runs" not in tables:
            raise FileFormatError(f"{self.path} claims schema version {version} but has no runs table")
        if version == 0 and tables:
            raise FileFormatError(
                f"{self.path} is an SQLite database but not a saelab results store "
                f"(tables: {', '.join(sorted(tables))}); it was left untouched")
        if version == 0 and not create:
            raise FileFormatError(f"{self.path} is an empty database, not a saelab results store")
        return version

    # ---------------------------------------------------------------- writing
    def start_run(self, protocol: str, arch: str, l0_target: float, seed: int, envelope: Mapping[str, Any],
                  *, pid: int | None = None) -> int:
        """Record a run as "running" and return its run_id. `envelope` is `saelab.provenance.envelope(...)`.

        pid defaults to this process; a driver that trains in a worker passes the worker's pid, since that is the
        process whose death means the run will never finish.
        """
        for field, value in (("protocol", protocol), ("arch", arch)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(field, value, "must be a non-empty string")
        l0 = _number(l0_target)
        if l0 is None or l0 <= 0:
            raise ConfigError("l0_target", l0_target, "must be a positive finite number")
        if isinstance(seed, bool) or not isinstance(_clean(seed), int):
            raise ConfigError("seed", seed, "must be an integer")
        if not isinstance(envelope, Mapping) or not isinstance(envelope.get("config"), Mapping):
            raise ConfigError("envelope", type(envelope).__name__,
                              "must be a dict with a 'config' dict (use saelab.provenance.envelope)")
        config = envelope["config"]
        config_hash = envelope.get("config_hash")
        if config_hash is None:
            from saelab.provenance import config_hash as _hash  # imports torch; only when the caller left it out
            config_hash = _hash(dict(config))
        pid = os.getpid() if pid is None else int(pid)
        stat = _proc_stat(pid)
        row = {
            "protocol": protocol.strip(), "arch": arch.strip(), "l0_target": float(l0), "seed": int(_clean(seed)),
            "status": "running", "pid": pid, "pid_start": stat[1] if stat else None, "hostname": self.hostname,
            "started_at": _now(), "config_json": _dumps(config), "config_hash": str(config_hash),
            "saelab_version": str(envelope.get("saelab_version", __version__)),
            "commit": None if envelope.get("commit") is None else str(envelope["commit"]),
            "hardware_json": None if envelope.get("hardware") is None else _dumps(envelope["hardware"]),
        }
        columns = ", ".join(f'"{k}"' for k in row)
        marks = ", ".join("?" for _ in row)
        with self._connect(write=True) as con:
            cur = con.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", tuple(row.values()))
            return int(cur.lastrowid)

    def _require_running(self, con: sqlite3.Connection, run_id: int) -> None:
        found = con.execute("SELECT status FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        if found is None:
            raise ConfigError("run_id", run_id, f"no such run in {self.path}")
        if found["status"] != "running":
            raise ConfigError("run_id", run_id, f"is already {found['status']}; only a running run can be closed")

    def finish_run(self, run_id: int, metrics: Mapping[str, Any], wall_seconds: float) -> None:
        """Mark a run complete with its metrics (f1, mcc, explained_variance, l0, dead_latents, ...)."""
        if not isinstance(metrics, Mapping):
            raise ConfigError("metrics", type(metrics).__name__, "must be a dict of metric name -> value")
        wall = _number(wall_seconds)
        if wall is None or wall < 0:
            raise ConfigError("wall_seconds", wall_seconds, "must be a finite number >= 0")
        clean = _clean(metrics)
        indexed = [_number(clean.get(name)) for name in INDEXED_METRICS]
        with self._connect(write=True) as con:
            self._require_running(con, run_id)
            con.execute(
                "UPDATE runs SET status = 'complete', finished_at = ?, wall_seconds = ?, metrics_json = ?, "
                + ", ".join(f"{name} = ?" for name in INDEXED_METRICS) + " WHERE run_id = ?",
                (_now(), float(wall), _dumps(clean), *indexed, int(run_id)),
            )

    def fail_run(self, run_id: int, error: str) -> None:
        """Mark a run failed; `error` says why (it is kept, and the run never enters a leaderboard)."""
        with self._connect(write=True) as con:
            self._require_running(con, run_id)
            con.execute("UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ?",
                        (_now(), str(error), int(run_id)))

    def mark_stale_incomplete(self) -> int:
        """Persist "incomplete" for running rows whose process on this host is gone; returns how many."""
        with self._connect(write=True) as con:
            rows = con.execute("SELECT run_id, pid, pid_start FROM runs WHERE status = 'running' AND hostname = ?",
                               (self.hostname,)).fetchall()
            stale = [r["run_id"] for r in rows if not _process_alive(r["pid"], r["pid_start"])]
            for run_id in stale:
                con.execute("UPDATE runs SET status = 'incomplete', error = ? WHERE run_id = ?",
                            ("the process running it ended without finishing it", run_id))
        return len(stale)

    # ---------------------------------------------------------------- reading
    def _effective_status(self, row: sqlite3.Row) -> str:
        if row["status"] == "running" and row["hostname"] == self.hostname \
                and not _process_alive(row["pid"], row["pid_start"]):
            return "incomplete"
        return row["status"]

    def _to_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["status"] = self._effective_status(row)
        d.pop("pid_start", None)
        try:
            d["config"] = json.loads(d.pop("config_json"))
            hw, metrics = d.pop("hardware_json"), d.pop("metrics_json")
            d["hardware"] = None if hw is None else json.loads(hw)
            d["metrics"] = None if metrics is None else json.loads(metrics)
        except (json.JSONDecodeError, TypeError) as err:
            raise FileFormatError(f"run {d.get('run_id')} in {self.path} has unreadable JSON: {err}") from None
        return d

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise ConfigError("run_id", run_id, f"no such run in {self.path}")
        return self._to_dict(row)

    def runs(self, protocol: str | Sequence[str] | None = None, arch: str | Sequence[str] | None = None,
             l0: float | Sequence[float] | None = None, status: str | Sequence[str] | None = None,
             since: str | _dt.datetime | None = None) -> list[dict[str, Any]]:
        """Runs matching every given filter (each may be one value or a list), oldest first.

        status is the reported status: a "running" row whose process is gone counts as "incomplete".
        """
        where, params = [], []
        for column, values in (("protocol", _as_list(protocol)), ("arch", _as_list(arch))):
            if values:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params.extend(str(v) for v in values)
        l0_values = _as_list(l0)
        if l0_values:
            numbers = []
            for v in l0_values:
                try:
                    numbers.append(float(v))
                except (TypeError, ValueError):
                    raise ConfigError("l0", v, "must be a number") from None
            where.append("(" + " OR ".join("abs(l0_target - ?) < 1e-9" for _ in numbers) + ")")
            params.extend(numbers)
        statuses = _as_list(status)
        for s in statuses or []:
            if s not in STATUSES:
                raise ConfigError("status", s, f"must be one of {', '.join(STATUSES)}")
        if statuses:
            # "running" and "incomplete" are decided after reading (liveness); the rest can be filtered in SQL.
            stored = set(statuses) | ({"running"} if "incomplete" in statuses else set())
            where.append(f"status IN ({', '.join('?' for _ in stored)})")
            params.extend(sorted(stored))
        if since is not None:
            where.append("started_at >= ?")
            params.append(_normalise_time(since))
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY run_id"
        with self._connect() as con:
            rows = [self._to_dict(r) for r in con.execute(sql, params).fetchall()]
        if statuses:
            rows = [r for r in rows if r["status"] in statuses]
        return rows

    def leaderboard(self, protocol: str | None = None, *, include_reference: bool = True) -> list[dict[str, Any]]:
        """One row per (protocol, arch, l0_target) over complete runs, best mean F1 first.

        Each row: source ("saelab" or "published"), protocol, arch, l0_target, n_seeds, <metric>_mean and
        <metric>_sd (sample sd; 0 for one seed) for f1, mcc, uniqueness, explained_variance, l0, dead_latents, and
        f1_best. If a seed was run more than once, its latest complete run counts. Published reference rows
        (saelab.bench.reference) are added for protocol None or "16k" unless include_reference=False.
        """
        complete = self.runs(protocol=protocol, status="complete")
        latest: dict[tuple[str, str, float, int], dict[str, Any]] = {}
        for run in complete:  # ordered by run_id, so a later run of the same seed replaces an earlier one
            latest[(run["protocol"], run["arch"], run["l0_target"], run["seed"])] = run
        groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
        for (proto, arch, l0_target, _), run in latest.items():
            groups.setdefault((proto, arch, l0_target), []).append(run)
        rows = []
        for (proto, arch, l0_target), group in groups.items():
            stats = summary(group)
            row: dict[str, Any] = {"source": "saelab", "protocol": proto, "arch": arch, "l0_target": l0_target,
                                   "n_seeds": stats.pop("n")}
            row.update(stats)
            row.update({"citation": None, "note": None})
            rows.append(row)
        if include_reference:
            rows.extend(reference_rows(protocol))
        return sort_leaderboard(rows)


def sort_leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple:
        f1 = row.get("f1_mean")
        return (f1 is None, -(f1 or 0.0), row["arch"], row["l0_target"], row.get("source", ""))
    return sorted(rows, key=key)


def _metric_value(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(name)
    if value is None and isinstance(row.get("metrics"), Mapping):
        value = row["metrics"].get(name)
    value = _number(value)
    return None if value is None else float(value)


def summary(group: Iterable[Mapping[str, Any]], metrics: Sequence[str] = LEADERBOARD_METRICS) -> dict[str, Any]:
    """Mean and sample sd of each metric over a group of runs (e.g. the seeds of one (arch, L0)).

    Rows may be store rows or plain metric dicts; a row with a status other than "complete" is skipped, so a
    killed or failed run can never leak into a summary. Returns n, <metric>_mean, <metric>_sd and f1_best; a metric
    missing from every row gives None; sd is 0 for a single value.
    """
    rows = [r for r in group if r.get("status", "complete") == "complete"]
    result: dict[str, Any] = {"n": len(rows)}
    for name in metrics:
        values = [v for v in (_metric_value(r, name) for r in rows) if v is not None]
        result[f"{name}_mean"] = statistics.fmean(values) if values else None
        result[f"{name}_sd"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    f1 = [v for v in (_metric_value(r, "f1") for r in rows) if v is not None]
    result["f1_best"] = max(f1) if f1 else None
    return result


def format_summary(stats: Mapping[str, Any], metrics: Sequence[str] = ("f1", "mcc", "explained_variance", "l0")) -> str:
    """'F1 0.7316 ± 0.0010 · MCC ... (n=5)' for the bench command's summary lines."""
    names = {"f1": "F1", "mcc": "MCC", "uniqueness": "uniq", "explained_variance": "EV", "l0": "L0",
             "dead_latents": "dead"}
    parts = []
    for name in metrics:
        mean, sd = stats.get(f"{name}_mean"), stats.get(f"{name}_sd")
        if mean is None:
            continue
        digits = 2 if name in ("l0", "dead_latents") else 4
        parts.append(f"{names.get(name, name)} {mean:.{digits}f} ± {(sd or 0.0):.{digits}f}")
    n = stats.get("n", stats.get("n_seeds"))
    return " · ".join(parts) + (f" (n={n})" if n is not None else "")


# -------------------------------------------------------------------- export
RUN_COLUMNS = ["run_id", "protocol", "arch", "l0_target", "seed", "status", "f1", "precision", "recall", "accuracy",
               "mcc", "uniqueness", "explained_variance", "shrinkage", "l0", "true_l0", "dead_latents", "mse",
               "samples_per_second", "wall_seconds", "started_at", "finished_at", "config_hash", "saelab_version",
               "commit", "hostname"]
LEADERBOARD_COLUMNS = ["source", "protocol", "arch", "l0_target", "n_seeds"] + [
    f"{m}_{s}" for m in LEADERBOARD_METRICS for s in ("mean", "sd")] + ["f1_best", "citation", "note"]
EXPORT_FORMATS = ("csv", "json", "md")


def _flat_run(run: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in run.items() if k not in ("config", "hardware", "metrics", "error", "pid")}
    for key, value in (run.get("metrics") or {}).items():
        if not isinstance(value, (dict, list)) and flat.get(key) is None:
            flat[key] = value
    return flat


def _check_complete(rows: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        if row.get("status") != "complete":
            raise ConfigError("rows", f"run {row.get('run_id')}",
                              f"is {row.get('status')}; only complete runs are exported as results")


def _md_cell(value: Any, column: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if column == "l0_target":
            return f"{value:g}"
        two_decimals = column in ("l0", "dead_latents", "wall_seconds", "samples_per_second")
        return f"{value:.2f}" if two_decimals else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _csv(columns: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue()


def _json_document(kind: str, rows: list[Any]) -> str:
    doc = {"kind": kind, "schema_version": SCHEMA_VERSION, "saelab_version": __version__, "exported_at": _now(),
           "rows": _clean(rows)}
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def parse_export_format(fmt: str) -> str:
    """'csv', 'json' or 'md' ('markdown' and a leading dot accepted); anything else is a ConfigError."""
    fmt = fmt.lower().lstrip(".")
    fmt = {"markdown": "md"}.get(fmt, fmt)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError("format", fmt, f"must be one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def export_runs(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], fmt: str) -> Path:
    """Write complete runs as csv (one column per metric), json (full rows with config and envelope) or md."""
    fmt, rows = parse_export_format(fmt), list(rows)
    _check_complete(rows)
    flat = [_flat_run(r) for r in rows]
    extra = [k for r in flat for k in r if k not in RUN_COLUMNS]
    columns = RUN_COLUMNS + list(dict.fromkeys(extra))
    if fmt == "csv":
        text = _csv(columns, flat)
    elif fmt == "json":
        text = _json_document("runs", [dict(r) for r in rows])
    else:
        md_columns = ["run_id", "protocol", "arch", "l0_target", "seed", "f1", "mcc", "uniqueness",
                      "explained_variance", "l0", "dead_latents", "wall_seconds", "commit"]
        text = _markdown(md_columns, [[_md_cell(r.get(c), c) for c in md_columns] for r in flat])
    write_text_atomic(path, text)
    return Path(path)


def export_leaderboard(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], fmt: str) -> Path:
    """Write leaderboard rows as csv/json (separate _mean/_sd columns) or md (mean ± sd cells)."""
    fmt, rows = parse_export_format(fmt), list(rows)
    if fmt == "csv":
        text = _csv(LEADERBOARD_COLUMNS, rows)
    elif fmt == "json":
        text = _json_document("leaderboard", [dict(r) for r in rows])
    else:
        headers = ["source", "protocol", "arch", "L0 target", "n seeds", "F1", "MCC", "uniqueness", "EV", "L0",
                   "dead", "best F1"]
        body = []
        for r in rows:
            cells = [_md_cell(r.get("source"), "source"), _md_cell(r.get("protocol"), "protocol"),
                     _md_cell(r.get("arch"), "arch"), _md_cell(r.get("l0_target"), "l0_target"),
                     _md_cell(r.get("n_seeds"), "n_seeds")]
            for m in LEADERBOARD_METRICS:
                mean, sd = r.get(f"{m}_mean"), r.get(f"{m}_sd")
                sd_text = _md_cell(float(sd or 0.0), m)
                cells.append("—" if mean is None else f"{_md_cell(float(mean), m)} ± {sd_text}")
            cells.append(_md_cell(r.get("f1_best"), "f1_best"))
            body.append(cells)
        text = _markdown(headers, body)
    write_text_atomic(path, text)
    return Path(path)


# -------------------------------------------------------------------- plot
def plot_f1_vs_l0(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """PNG with F1 vs L0 and MCC vs L0 from leaderboard rows: one line per architecture with ±sd error bars;
    published reference rows as hollow markers."""
    # The Agg canvas directly (no pyplot): no global backend state, works without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("f1_mean") is not None or r.get("mcc_mean") is not None]
    if not rows:
        raise ConfigError("rows", 0, "nothing to plot: no leaderboard rows with F1 or MCC")
    archs = sorted({r["arch"] for r in rows})
    colours = {arch: f"C{i % 10}" for i, arch in enumerate(archs)}
    several_protocols = len({r["protocol"] for r in rows}) > 1
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["arch"], r.get("source", "saelab"), r["protocol"]), []).append(r)

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("f1", "mcc"), ("F1 (mean over latents)", "MCC")):
        # saelab's line first, then the published markers of the same architecture
        for (arch, source, protocol), group in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] != "saelab",
                                                                                      kv[0][2])):
            points = sorted((float(r["l0_target"]), float(r[f"{metric}_mean"]), float(r.get(f"{metric}_sd") or 0.0))
                            for r in group if r.get(f"{metric}_mean") is not None)
            if not points:
                continue
            x, y, err = zip(*points)
            name = arch + (f" [{protocol}]" if several_protocols else "")
            if source == "published":
                ax.errorbar(x, y, yerr=err, fmt="o", linestyle="none", markerfacecolor="none", markersize=8,
                            markeredgewidth=1.5, color=colours[arch], capsize=3, label=f"{name} (published)")
            else:
                ax.errorbar(x, y, yerr=err, fmt="-o", color=colours[arch], capsize=3, label=name)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
