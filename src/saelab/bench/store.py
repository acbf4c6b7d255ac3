"""The results store: every bench run as one row of an embedded SQLite database (schema, open/migrate, rows).

A run is written twice: `start_run` records it as "running" (with the pid and hostname of the process doing it),
`finish_run` or `fail_run` closes it. A process killed in between leaves a "running" row whose pid is gone; queries
report such rows as "incomplete", and only "complete" rows ever reach a leaderboard, a summary or an export.

Several bench processes may write one store at once: the database is in WAL mode, every write is a short
`BEGIN IMMEDIATE` transaction, and a busy timeout makes a writer wait for the lock instead of failing.

Statistics over seeds live in bench/leaderboard.py, exports in bench/export.py, the figure in bench/plots.py.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saelab import __version__
from saelab.bench.leaderboard import leaderboard_rows, sort_leaderboard, summary  # noqa: F401  (report/data.py imports the last two from here)
from saelab.bench.values import clean as _clean
from saelab.bench.values import dumps as _dumps
from saelab.bench.values import now_utc as _now
from saelab.bench.values import number as _number
from saelab.errors import ConfigError, FileFormatError

SCHEMA_VERSION = 1
DEFAULT_STORE = Path("runs") / "results.sqlite"
STORE_ENV = "SAELAB_STORE"
STATUSES = ("running", "complete", "failed", "incomplete")
# Metrics that get their own (indexed) column; everything else lives in metrics_json.
INDEXED_METRICS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_latents")
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


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a Linux process, or None where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces, so split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
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


# Every column of the runs table (as in _SCHEMA) with its type. A store written by an older saelab that lacks some
# of them gets them added when it is opened for writing; the core ones (NOT NULL, no default) cannot be added, and
# a runs table without them is not a saelab store.
_COLUMNS = {
    "run_id": "INTEGER",
    "protocol": "TEXT",
    "arch": "TEXT",
    "l0_target": "REAL",
    "seed": "INTEGER",
    "status": "TEXT",
    "pid": "INTEGER",
    "pid_start": "INTEGER",
    "hostname": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
    "wall_seconds": "REAL",
    "config_json": "TEXT",
    "config_hash": "TEXT",
    "saelab_version": "TEXT",
    "commit": "TEXT",
    "hardware_json": "TEXT",
    "metrics_json": "TEXT",
    "error": "TEXT",
    "f1": "REAL",
    "mcc": "REAL",
    "uniqueness": "REAL",
    "explained_variance": "REAL",
    "l0": "REAL",
    "dead_latents": "NUMERIC",
}
_CORE_COLUMNS = ("run_id", "protocol", "arch", "l0_target", "seed", "status", "started_at", "config_json")


class ResultsStore:
    """A SQLite file of bench runs.

    `create=False` opens an existing store read-only (read commands use it): nothing is written, not even a schema
    upgrade, so a store on read-only media can be read. A writable open checks the schema first and adds the
    columns an older store lacks, so a result is never lost at the end of a training run.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, timeout: float = 60.0):
        self.path = Path(path).expanduser()
        self.timeout = float(timeout)
        self.hostname = socket.gethostname()
        self.read_only = not create
        self._uri: str | None = None  # the read-only URI once opened read-only
        if self.path.is_dir():
            raise ConfigError("store", str(self.path), "is a folder; give a file such as runs/results.sqlite")
        has_content = self.path.exists() and self.path.stat().st_size > 0
        if has_content:
            self._check_header()
        elif not create:
            raise FileFormatError(
                f"no results store at {self.path}: run `saelab bench` first, or point --store / ${STORE_ENV} at one"
            )
        if create:
            self._check_writable()
            self._open_schema()
        else:
            self._open_read_only()

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
                f"{self.path} is not a saelab results store (not an SQLite file); it was left untouched"
            )

    def _check_writable(self) -> None:
        from saelab.bench.paths import _probe_writable

        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError("store", str(self.path), f"cannot create its folder: {err.strerror or err}") from None
        # WAL mode creates -wal and -shm files beside the database, so the folder itself must be writable. Real
        # opens, not os.access: root passes access() on a read-only mount or an immutable file.
        _probe_writable(parent, "store", str(self.path))
        if self.path.exists():
            try:
                os.close(os.open(self.path, os.O_RDWR))
            except OSError as err:
                raise ConfigError("store", str(self.path), f"is read-only: {err.strerror or err}") from None

    def _read_only_uri(self, immutable: bool) -> str:
        from urllib.parse import quote

        return f"file:{quote(str(self.path.absolute()))}?" + ("immutable=1" if immutable else "mode=ro")

    def _connect_raw(self, uri: str | None) -> sqlite3.Connection:
        """A connection, untranslated errors (the read-only open needs to see which error it was)."""
        if uri is None:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        else:
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if uri is None:
                con.execute("PRAGMA synchronous = FULL")  # results are few and precious: fsync every commit
        except BaseException:
            con.close()
            raise
        return con

    def _raw_connect(self) -> sqlite3.Connection:
        try:
            return self._connect_raw(self._uri)
        except sqlite3.Error as err:  # a corrupt file fails already in the first PRAGMA
            raise self._translate(err) from None

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (safe across fork/threads); with write=True, one IMMEDIATE transaction."""
        if write and self.read_only:
            raise ConfigError("store", str(self.path), "was opened read-only (create=False); it cannot be written")
        con = self._raw_connect()
        try:
            if write:
                con.execute("BEGIN IMMEDIATE")  # take the write lock up front: no deadlock on lock upgrade
            yield con
            if write:
                con.execute("COMMIT")
        except sqlite3.Error as err:
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

    def _translate(self, err: sqlite3.Error) -> Exception:
        """Every SQLite error as a one-line saelab error naming the store."""
        text = " ".join(str(err).split()) or type(err).__name__
        if "not a database" in text or "malformed" in text:
            return FileFormatError(f"results store {self.path} is corrupt or truncated: {text}")
        if "locked" in text or "busy" in text:
            return ConfigError(
                "store", str(self.path), f"stayed locked by another writer for over {self.timeout:g} s: {text}"
            )
        if self.read_only:
            return FileFormatError(f"cannot read results store {self.path}: {text}")
        if "readonly" in text or "unable to open" in text or "disk I/O" in text:
            return ConfigError("store", str(self.path), f"is not writable: {text}")
        return FileFormatError(f"results store {self.path} cannot be used: {text}")

    def _open_read_only(self) -> None:
        """mode=ro first; where that cannot open (a WAL store on read-only media cannot create its -shm file),
        immutable=1, which reads the main file without any locking or shared memory."""
        last: sqlite3.Error | None = None
        for immutable in (False, True):
            uri = self._read_only_uri(immutable)
            try:
                con = self._connect_raw(uri)
            except sqlite3.Error as err:
                last = err
                continue
            try:
                con.execute("BEGIN")
                self._check_version(con, create=False)
                self._missing_columns(con)  # refuses a runs table without the core columns; the rest read as None
                con.execute("COMMIT")
            except sqlite3.Error as err:
                last = err
                text = str(err)
                if "unable to open" in text or "readonly" in text or "disk I/O" in text:
                    continue
                raise self._translate(err) from None
            except BaseException:
                self._rollback(con)
                raise
            finally:
                con.close()
            self._uri = uri
            if immutable:
                self._warn_unread_wal()
            return
        assert last is not None
        raise self._translate(last) from None

    def _warn_unread_wal(self) -> None:
        wal = Path(str(self.path) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            import warnings

            warnings.warn(
                f"{wal} holds changes that cannot be read on read-only media; they are not shown", stacklevel=3
            )

    def _missing_columns(self, con: sqlite3.Connection) -> list[str]:
        have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        if not have:
            return []  # no runs table yet: _check_version has judged that case
        core_missing = [c for c in _CORE_COLUMNS if c not in have]
        if core_missing:
            raise FileFormatError(
                f"{self.path} has a runs table without {', '.join(core_missing)}: not a saelab results store; "
                f"it was left untouched"
            )
        return [c for c in _COLUMNS if c not in have]

    def _open_schema(self) -> None:
        con = self._raw_connect()
        try:
            # Version and tables are read in one transaction: another process may be creating the schema right now.
            con.execute("BEGIN")
            version = self._check_version(con, create=True)
            missing = self._missing_columns(con) if version else []
            con.execute("COMMIT")
            if version == 0 or missing:
                con.execute("BEGIN IMMEDIATE")
                if self._check_version(con, create=True) == 0:  # still empty now that we hold the write lock
                    for statement in _SCHEMA:
                        con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                else:  # an older store: add what it lacks (another process may have just done so)
                    for name in self._missing_columns(con):
                        con.execute(f'ALTER TABLE runs ADD COLUMN "{name}" {_COLUMNS[name]}')
                    for statement in _SCHEMA[1:]:  # indexes, some on the columns just added
                        con.execute(statement)
                con.execute("COMMIT")
            self._ensure_wal(con)
        except sqlite3.Error as err:
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
                f"{__version__} reads (up to {SCHEMA_VERSION}); upgrade saelab. The file was left untouched"
            )
        if version == SCHEMA_VERSION and "runs" not in tables:
            raise FileFormatError(f"{self.path} claims schema version {version} but has no runs table")
        if version == 0 and tables:
            raise FileFormatError(
                f"{self.path} is an SQLite database but not a saelab results store "
                f"(tables: {', '.join(sorted(tables))}); it was left untouched"
            )
        if version == 0 and not create:
            raise FileFormatError(f"{self.path} is an empty database, not a saelab results store")
        return version

    # ---------------------------------------------------------------- writing
    def start_run(
        self,
        protocol: str,
        arch: str,
        l0_target: float,
        seed: int,
        envelope: Mapping[str, Any],
        *,
        pid: int | None = None,
    ) -> int:
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
            raise ConfigError(
                "envelope",
                type(envelope).__name__,
                "must be a dict with a 'config' dict (use saelab.provenance.envelope)",
            )
        config = envelope["config"]
        config_hash = envelope.get("config_hash")
        if config_hash is None:
            from saelab.provenance import config_hash as _hash  # imports torch; only when the caller left it out

            config_hash = _hash(dict(config))
        pid = os.getpid() if pid is None else int(pid)
        stat = _proc_stat(pid)
        row = {
            "protocol": protocol.strip(),
            "arch": arch.strip(),
            "l0_target": float(l0),
            "seed": int(_clean(seed)),
            "status": "running",
            "pid": pid,
            "pid_start": stat[1] if stat else None,
            "hostname": self.hostname,
            "started_at": _now(),
            "config_json": _dumps(config),
            "config_hash": str(config_hash),
            "saelab_version": str(envelope.get("saelab_version", __version__)),
            "commit": None if envelope.get("commit") is None else str(envelope["commit"]),
            "hardware_json": None if envelope.get("hardware") is None else _dumps(envelope["hardware"]),
        }
        columns = ", ".join(f'"{k}"' for k in row)
        marks = ", ".join("?" for _ in row)
        with self._connect(write=True) as con:
            cur = con.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", tuple(row.values()))
            assert cur.lastrowid is not None  # set by every INSERT
            return cur.lastrowid

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
                + ", ".join(f"{name} = ?" for name in INDEXED_METRICS)
                + " WHERE run_id = ?",
                (_now(), float(wall), _dumps(clean), *indexed, int(run_id)),
            )

    def fail_run(self, run_id: int, error: str) -> None:
        """Mark a run failed; `error` says why (it is kept, and the run never enters a leaderboard)."""
        with self._connect(write=True) as con:
            self._require_running(con, run_id)
            con.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ?",
                (_now(), str(error), int(run_id)),
            )

    def mark_stale_incomplete(self) -> int:
        """Persist "incomplete" for running rows whose process on this host is gone; returns how many."""
        with self._connect(write=True) as con:
            rows = con.execute(
                "SELECT run_id, pid, pid_start FROM runs WHERE status = 'running' AND hostname = ?", (self.hostname,)
            ).fetchall()
            stale = [r["run_id"] for r in rows if not _process_alive(r["pid"], r["pid_start"])]
            for run_id in stale:
                con.execute(
                    "UPDATE runs SET status = 'incomplete', error = ? WHERE run_id = ?",
                    ("the process running it ended without finishing it", run_id),
                )
        return len(stale)

    def mark_continued(self, protocol: str, arch: str, l0_target: float, seed: int, new_run_id: int) -> int:
        """`bench --resume` took over: earlier unfinished rows of this (protocol, arch, L0, seed) on this host
        become "incomplete" with a note naming the run that continues them. Returns how many."""
        self.mark_stale_incomplete()
        with self._connect(write=True) as con:
            cur = con.execute(
                "UPDATE runs SET status = 'incomplete', error = ? WHERE protocol = ? AND arch = ? AND l0_target = ? "
                "AND seed = ? AND run_id < ? AND status = 'incomplete' AND hostname = ?",
                (
                    f"continued by run {int(new_run_id)} (bench --resume)",
                    protocol,
                    arch,
                    float(l0_target),
                    int(seed),
                    int(new_run_id),
                    self.hostname,
                ),
            )
            return cur.rowcount

    # ---------------------------------------------------------------- reading
    def _effective_status(self, row: Mapping[str, Any]) -> str:
        if (
            row["status"] == "running"
            and row["hostname"] == self.hostname
            and not _process_alive(row["pid"], row["pid_start"])
        ):
            return "incomplete"
        return row["status"]

    def _to_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        d: dict[str, Any] = {name: None for name in _COLUMNS}  # an older store read as-is lacks some columns
        d.update(dict(row))
        d["status"] = self._effective_status(d)
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

    def runs(
        self,
        protocol: str | Sequence[str] | None = None,
        arch: str | Sequence[str] | None = None,
        l0: float | Sequence[float] | None = None,
        status: str | Sequence[str] | None = None,
        since: str | _dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
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
        """One row per (protocol, arch, l0_target, samples) over complete runs, best mean F1 first
        (see saelab.bench.leaderboard.leaderboard_rows)."""
        return leaderboard_rows(
            self.runs(protocol=protocol, status="complete"), protocol, include_reference=include_reference
        )
