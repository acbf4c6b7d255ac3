"""The results store: real SQLite files, real processes (killed runs, concurrent writers)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from saelab.bench import (
    REFERENCE_CITATION,
    ResultsStore,
    export_leaderboard,
    export_runs,
    format_summary,
    plot_f1_vs_l0,
    reference_rows,
    summary,
)
from saelab.bench.store import SCHEMA_VERSION
from saelab.errors import ConfigError, FileFormatError

SRC = str(Path(__file__).resolve().parents[2] / "src")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def env(config=None):
    config = config or {"samples": 1000}
    return {
        "config": config,
        "config_hash": "h" * 16,
        "saelab_version": "0.1.0",
        "commit": "abc123",
        "hardware": {"device": "cpu", "cpu_count": 2},
        "time": "2026-01-01T00:00:00+00:00",
    }


def metrics(f1, mcc=0.7, **extra):
    return {
        "f1": f1,
        "precision": 0.8,
        "recall": 0.6,
        "accuracy": 0.99,
        "mcc": mcc,
        "uniqueness": 0.95,
        "explained_variance": 0.8,
        "shrinkage": 0.97,
        "l0": 12.3,
        "true_l0": 11.0,
        "dead_latents": 4,
        "mse": 0.1,
        "samples_per_second": 1e5,
        **extra,
    }


def run_python(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=60,
        **kw,
    )


@pytest.fixture
def store(tmp_path):
    return ResultsStore(tmp_path / "runs" / "results.sqlite")


def test_start_finish_and_query(store):
    run_id = store.start_run("mini", "batchtopk", 12, 0, env({"samples": 1000, "seed": 0}))
    row = store.get_run(run_id)
    assert row["status"] == "running" and row["pid"] == os.getpid()
    assert row["config"] == {"samples": 1000, "seed": 0} and row["commit"] == "abc123"
    assert row["hardware"] == {"device": "cpu", "cpu_count": 2} and row["finished_at"] is None

    store.finish_run(run_id, metrics(0.61, precision=float("nan")), wall_seconds=3.5)
    row = store.get_run(run_id)
    assert row["status"] == "complete" and row["wall_seconds"] == 3.5
    assert row["f1"] == 0.61 and row["mcc"] == 0.7 and row["l0"] == 12.3 and row["dead_latents"] == 4
    assert row["metrics"]["true_l0"] == 11.0 and row["metrics"]["precision"] is None  # NaN is stored as null
    assert row["finished_at"] >= row["started_at"]

    other = store.start_run("16k", "matryoshka", 25, 1, env())
    assert [r["run_id"] for r in store.runs()] == [run_id, other]
    assert [r["run_id"] for r in store.runs(protocol="16k")] == [other]
    assert [r["run_id"] for r in store.runs(arch="batchtopk")] == [run_id]
    assert [r["run_id"] for r in store.runs(arch=["batchtopk", "matryoshka"])] == [run_id, other]
    assert [r["run_id"] for r in store.runs(l0=25)] == [other]
    assert [r["run_id"] for r in store.runs(status="complete")] == [run_id]
    assert [r["run_id"] for r in store.runs(status="running")] == [other]
    assert store.runs(since="2999-01-01") == []
    assert len(store.runs(since="2000-01-01T00:00:00Z")) == 2


def test_real_provenance_envelope(store):
    from saelab.provenance import envelope

    e = envelope({"arch": "topk", "samples": 10}, "cpu")
    run_id = store.start_run("custom", "topk", 8, 3, e)
    row = store.get_run(run_id)
    assert row["config_hash"] == e["config_hash"] and row["saelab_version"] == e["saelab_version"]
    assert row["hardware"]["device"] == "cpu" and row["commit"] == e["commit"]


def test_fail_run_and_invalid_transitions(store):
    run_id = store.start_run("mini", "topk", 10, 0, env())
    store.fail_run(run_id, "TrainingDivergedError: loss is NaN at step 12")
    row = store.get_run(run_id)
    assert row["status"] == "failed" and "NaN" in row["error"]
    with pytest.raises(ConfigError) as err:
        store.finish_run(run_id, metrics(0.5), 1.0)
    assert err.value.field == "run_id" and "failed" in str(err.value)
    with pytest.raises(ConfigError, match="no such run"):
        store.finish_run(999, metrics(0.5), 1.0)
    assert store.leaderboard("mini") == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(protocol="", arch="topk", l0_target=10, seed=0), "protocol"),
        (dict(protocol="mini", arch="topk", l0_target=-1, seed=0), "l0_target"),
        (dict(protocol="mini", arch="topk", l0_target=float("nan"), seed=0), "l0_target"),
        (dict(protocol="mini", arch="topk", l0_target=10, seed=1.5), "seed"),
    ],
)
def test_start_run_validates(store, kwargs, field):
    with pytest.raises(ConfigError) as err:
        store.start_run(envelope=env(), **kwargs)
    assert err.value.field == field


def test_query_and_finish_validation(store):
    run_id = store.start_run("mini", "topk", 10, 0, env())
    with pytest.raises(ConfigError, match="status='done'"):
        store.runs(status="done")
    with pytest.raises(ConfigError, match="since='yesterday'"):
        store.runs(since="yesterday")
    with pytest.raises(ConfigError) as err:
        store.finish_run(run_id, metrics(0.5), wall_seconds=-2)
    assert err.value.field == "wall_seconds"
    with pytest.raises(ConfigError) as err:
        store.finish_run(run_id, [0.5], wall_seconds=1)
    assert err.value.field == "metrics"
    with pytest.raises(ConfigError) as err:
        store.start_run("mini", "topk", 10, 0, {"config_hash": "x"})
    assert err.value.field == "envelope"


def _sample_sd(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _add(store, arch, l0, seed, f1, mcc, protocol="mini", **extra):
    run_id = store.start_run(protocol, arch, l0, seed, env())
    store.finish_run(run_id, metrics(f1, mcc, **extra), wall_seconds=1.0)
    return run_id


def test_leaderboard_mean_and_sample_sd(store):
    f1s, mccs, deads = [0.5, 0.6, 0.9], [0.70, 0.72, 0.77], [3, 5, 10]
    for seed, (f1, mcc, dead) in enumerate(zip(f1s, mccs, deads)):
        _add(store, "batchtopk", 12, seed, f1, mcc, dead_latents=dead)
    _add(store, "matryoshka", 12, 0, 0.8, 0.75)  # a single seed: sd 0
    # seed 1 of standard was re-run: only its latest complete run counts
    _add(store, "standard", 12, 0, 0.40, 0.6)
    _add(store, "standard", 12, 1, 0.10, 0.6)
    _add(store, "standard", 12, 1, 0.30, 0.6)
    failed = store.start_run("mini", "batchtopk", 12, 3, env())
    store.fail_run(failed, "boom")
    store.start_run("mini", "batchtopk", 12, 4, env())  # still running in this (live) process
    _add(store, "batchtopk", 12, 0, 0.99, 0.99, protocol="custom")  # another protocol

    board = store.leaderboard("mini", include_reference=False)
    assert [(r["arch"], r["l0_target"]) for r in board] == [("matryoshka", 12), ("batchtopk", 12), ("standard", 12)]
    btk = board[1]
    assert btk["source"] == "saelab" and btk["protocol"] == "mini" and btk["n_seeds"] == 3
    assert btk["f1_mean"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert btk["f1_sd"] == pytest.approx(math.sqrt(((0.5 - 2 / 3) ** 2 + (0.6 - 2 / 3) ** 2 + (0.9 - 2 / 3) ** 2) / 2))
    assert btk["mcc_mean"] == pytest.approx(sum(mccs) / 3) and btk["mcc_sd"] == pytest.approx(_sample_sd(mccs))
    assert btk["dead_latents_mean"] == pytest.approx(6.0) and btk["dead_latents_sd"] == pytest.approx(_sample_sd(deads))
    assert btk["explained_variance_sd"] == pytest.approx(0.0) and btk["f1_best"] == 0.9
    assert board[0]["n_seeds"] == 1 and board[0]["f1_sd"] == 0.0 and board[0]["mcc_sd"] == 0.0
    assert board[2]["n_seeds"] == 2 and board[2]["f1_mean"] == pytest.approx(0.35)

    # Published baselines: only beside 16k (or unfiltered) boards, marked as such.
    assert not any(r["source"] == "published" for r in store.leaderboard("mini"))
    everything = store.leaderboard()
    published = [r for r in everything if r["source"] == "published"]
    assert len(published) == 10 and all(r["citation"] == REFERENCE_CITATION for r in published)
    assert [r["f1_mean"] for r in everything] == sorted((r["f1_mean"] for r in everything), reverse=True)
    assert everything[0]["protocol"] == "custom"  # 0.99 beats every published F1


def test_summary_helper_and_format():
    rows = [
        {"f1": 0.5, "mcc": 0.6, "status": "complete"},
        {"metrics": {"f1": 0.7, "mcc": 0.8}},
        {"f1": 0.99, "status": "incomplete"},
    ]  # the incomplete row never counts
    s = summary(rows, metrics=("f1", "mcc", "l0"))
    assert s["n"] == 2 and s["f1_mean"] == pytest.approx(0.6) and s["f1_sd"] == pytest.approx(_sample_sd([0.5, 0.7]))
    assert s["l0_mean"] is None and s["f1_best"] == 0.7
    assert format_summary(s) == "F1 0.6000 ± 0.1414 · MCC 0.7000 ± 0.1414 (n=2)"


def test_reference_rows_match_published_tables():
    rows = {(r["arch"], r["l0_target"]): r for r in reference_rows()}
    assert set(a for a, _ in rows) == {"batchtopk", "matryoshka", "matching_pursuit", "standard", "jumprelu"}
    assert rows[("matryoshka", 25.0)]["f1_mean"] == 0.8793 and rows[("matryoshka", 25.0)]["f1_sd"] == 0.0021
    assert rows[("matching_pursuit", 25.0)]["explained_variance_mean"] == 0.8351
    assert rows[("batchtopk", 20.0)]["mcc_mean"] == 0.7526 and rows[("standard", 20.0)]["uniqueness_sd"] == 0.0055
    assert rows[("jumprelu", 20.0)]["f1_mean"] == 0.8241
    assert all(r["protocol"] == "16k" and r["source"] == "published" for r in rows.values())
    assert reference_rows("mini") == []


START_AND_HANG = """
import sys, time
from saelab.bench import ResultsStore
store = ResultsStore(sys.argv[1])
run_id = store.start_run("mini", "batchtopk", 12, 7, {"config": {"x": 1}, "config_hash": "h"})
print(run_id, flush=True)
time.sleep(60)
"""


def test_killed_run_is_incomplete_never_a_result(store):
    _add(store, "batchtopk", 12, 0, 0.5, 0.7)
    proc = subprocess.Popen(
        [sys.executable, "-c", START_AND_HANG, str(store.path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        run_id = int(proc.stdout.readline())
        assert store.get_run(run_id)["status"] == "running"  # alive: genuinely running
        assert store.runs(status="incomplete") == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()

    assert store.get_run(run_id)["status"] == "incomplete"
    assert [r["run_id"] for r in store.runs(status="incomplete")] == [run_id]
    assert all(r["run_id"] != run_id for r in store.runs(status="running"))
    board = store.leaderboard("mini")
    assert len(board) == 1 and board[0]["n_seeds"] == 1 and board[0]["f1_mean"] == 0.5
    with pytest.raises(ConfigError, match="incomplete"):
        export_runs(store.runs(), store.path.parent / "all.csv", "csv")

    assert store.mark_stale_incomplete() == 1
    assert store.mark_stale_incomplete() == 0
    with sqlite3.connect(store.path) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0] == "incomplete"
    with pytest.raises(ConfigError, match="incomplete"):
        store.finish_run(run_id, metrics(0.9), 1.0)


def test_dead_pid_from_a_finished_process_and_reused_pid(store):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    run_id = store.start_run("mini", "topk", 10, 0, env(), pid=dead_pid)
    assert store.get_run(run_id)["status"] == "incomplete"
    # Our own pid, but recorded with another process's start time: the pid was reused, the run is dead.
    mine = store.start_run("mini", "topk", 10, 1, env())
    assert store.get_run(mine)["status"] == "running"
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE runs SET pid_start = pid_start + 1 WHERE run_id = ?", (mine,))
    if Path("/proc/self/stat").exists():
        assert store.get_run(mine)["status"] == "incomplete"


WRITER = """
import sys, time
from pathlib import Path
from saelab.bench import ResultsStore
path, writer, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
store = ResultsStore(path)
(go.parent / f"ready{writer}").touch()
while not go.exists():  # start both writers at the same moment
    time.sleep(0.005)
for seed in range(n):
    run_id = store.start_run("mini", f"writer{writer}", 10, seed, {"config": {"seed": seed}, "config_hash": "h"})
    store.finish_run(run_id, {"f1": seed / n, "mcc": writer}, wall_seconds=0.0)
    time.sleep(0.002)  # yield the CPU: on a busy machine one writer could otherwise finish within one time slice
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path, go, n = tmp_path / "shared.sqlite", tmp_path / "go", 100
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), str(n), str(go)],
            env={**os.environ, "PYTHONPATH": SRC},
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    # Start only once both have imported and opened the store: on a loaded machine imports alone can
    # take seconds, and a writer that finished before the other started would prove nothing.
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers did not start"
        time.sleep(0.01)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = ResultsStore(path, create=False)
    rows = store.runs()
    assert len(rows) == 2 * n and len({r["run_id"] for r in rows}) == 2 * n
    assert all(r["status"] == "complete" for r in rows)
    for w in range(2):
        mine = [r for r in rows if r["arch"] == f"writer{w}"]
        assert sorted(r["seed"] for r in mine) == list(range(n))
        assert all(r["mcc"] == w and r["f1"] == pytest.approx(r["seed"] / n) for r in mine)
    # The writes really interleaved (otherwise this test would prove nothing about concurrency).
    order = [r["arch"] for r in rows]
    assert sum(a != b for a, b in zip(order, order[1:])) > 1


def test_random_bytes_file_is_rejected_and_left_unchanged(tmp_path):
    path = tmp_path / "results.sqlite"
    data = random.Random(0).randbytes(8192)
    path.write_bytes(data)
    for create in (True, False):
        with pytest.raises(FileFormatError, match="not an SQLite file"):
            ResultsStore(path, create=create)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]  # no -wal / -shm either


def test_newer_schema_and_foreign_database_are_rejected_unchanged(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as con:
        con.execute("CREATE TABLE runs (x)")
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    before = newer.read_bytes()
    with pytest.raises(FileFormatError, match="newer"):
        ResultsStore(newer)
    assert newer.read_bytes() == before

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE recipes (name TEXT)")
    con.close()
    before = foreign.read_bytes()
    with pytest.raises(FileFormatError, match="not a saelab results store"):
        ResultsStore(foreign)
    assert foreign.read_bytes() == before


def test_reopen_keeps_runs_and_uses_wal(tmp_path):
    path = tmp_path / "r.sqlite"
    run_id = _add(ResultsStore(path), "topk", 10, 0, 0.4, 0.5)
    again = ResultsStore(path, create=False)
    assert again.get_run(run_id)["f1"] == 0.4
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_missing_store_is_an_error_for_readers_and_not_created(tmp_path):
    path = tmp_path / "nowhere" / "results.sqlite"
    with pytest.raises(FileFormatError, match="no results store"):
        ResultsStore(path, create=False)
    assert not path.exists() and not path.parent.exists()


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        ResultsStore(blocker / "results.sqlite")
    assert err.value.field == "store" and "a_file" in str(err.value)
    with pytest.raises(ConfigError, match="is a folder"):
        ResultsStore(tmp_path)


@pytest.fixture
def filled(store):
    for seed, f1 in enumerate([0.5, 0.7]):
        _add(store, "batchtopk", 12, seed, f1, 0.6 + seed / 10)
    _add(store, "matching_pursuit", 8, 0, 0.3, 0.5, custom_metric=1.25)
    return store


def test_export_runs_parse_back(filled, tmp_path):
    rows = filled.runs(status="complete")
    export_runs(rows, tmp_path / "runs.csv", "csv")
    with open(tmp_path / "runs.csv", newline="") as f:
        parsed = list(csv.DictReader(f))
    assert [int(r["run_id"]) for r in parsed] == [r["run_id"] for r in rows]
    assert [float(r["f1"]) for r in parsed] == [0.5, 0.7, 0.3]
    assert parsed[2]["arch"] == "matching_pursuit" and float(parsed[2]["l0_target"]) == 8.0
    assert float(parsed[0]["precision"]) == 0.8 and parsed[2]["custom_metric"] == "1.25"
    assert parsed[0]["custom_metric"] == "" and parsed[0]["commit"] == "abc123"

    export_runs(rows, tmp_path / "runs.json", "json")
    doc = json.loads((tmp_path / "runs.json").read_text())
    assert doc["kind"] == "runs" and [r["f1"] for r in doc["rows"]] == [0.5, 0.7, 0.3]
    assert doc["rows"][0]["config"] == {"samples": 1000} and doc["rows"][0]["metrics"]["true_l0"] == 11.0

    export_runs(rows, tmp_path / "runs.md", "md")
    lines = (tmp_path / "runs.md").read_text().splitlines()
    assert lines[0].startswith("| run_id | protocol | arch |") and set(lines[1]) <= set("| -")
    assert len(lines) == 2 + 3 and "matching_pursuit" in lines[4] and "0.3000" in lines[4]
    with pytest.raises(ConfigError, match="format='xlsx'"):
        export_runs(rows, tmp_path / "runs.xlsx", "xlsx")


def test_export_leaderboard_parse_back(filled, tmp_path):
    board = filled.leaderboard()
    export_leaderboard(board, tmp_path / "board.csv", "csv")
    with open(tmp_path / "board.csv", newline="") as f:
        parsed = list(csv.DictReader(f))
    assert len(parsed) == len(board) == 2 + 10
    btk = next(r for r in parsed if r["source"] == "saelab" and r["arch"] == "batchtopk")
    assert float(btk["f1_mean"]) == pytest.approx(0.6) and float(btk["f1_sd"]) == pytest.approx(_sample_sd([0.5, 0.7]))
    assert int(btk["n_seeds"]) == 2
    mp = next(
        r
        for r in parsed
        if r["source"] == "published" and r["arch"] == "matching_pursuit" and float(r["l0_target"]) == 25
    )
    assert float(mp["f1_mean"]) == 0.4464 and mp["n_seeds"] == "" and mp["citation"] == REFERENCE_CITATION

    export_leaderboard(board, tmp_path / "board.json", "json")
    doc = json.loads((tmp_path / "board.json").read_text())
    assert doc["kind"] == "leaderboard" and doc["rows"] == json.loads(json.dumps(board))

    export_leaderboard(board, tmp_path / "board.md", "md")
    lines = (tmp_path / "board.md").read_text().splitlines()
    assert lines[0].startswith("| source | protocol | arch | L0 target |") and lines[1].startswith("| --- |")
    assert any("published" in line and "0.8793 ± 0.0021" in line for line in lines)
    assert any("saelab" in line and "0.6000 ± 0.1414" in line for line in lines)


def test_plot_writes_a_png(filled, tmp_path):
    out = tmp_path / "plots" / "f1_vs_l0.png"
    plot_f1_vs_l0(filled.leaderboard(), out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["f1_vs_l0.png"]  # atomic: no temporary left behind
    with pytest.raises(ConfigError, match="nothing to plot"):
        plot_f1_vs_l0([], tmp_path / "empty.png")
