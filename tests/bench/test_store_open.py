"""Opening a results store: older schemas are upgraded up front, corrupt files give one-line errors, read commands
work on read-only media, and exports refuse an --out they cannot write."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saelab.bench import ResultsStore, export_leaderboard, export_runs, plot_f1_vs_l0
from saelab.bench.store import _COLUMNS, SCHEMA_VERSION
from saelab.cli import main
from saelab.errors import ConfigError, FileFormatError

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {"config": {"samples": 100}, "config_hash": "h", "commit": "abc"}
METRICS = {"f1": 0.8, "mcc": 0.7, "explained_variance": 0.79, "l0": 3.0, "dead_latents": 2, "uniqueness": 0.98}

# The runs table of an older saelab: no pid_start, hostname, error, uniqueness or dead_latents.
OLD_TABLE = """CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, protocol TEXT NOT NULL, arch TEXT NOT NULL, l0_target REAL NOT NULL,
    seed INTEGER NOT NULL, status TEXT NOT NULL, pid INTEGER, started_at TEXT NOT NULL, finished_at TEXT,
    wall_seconds REAL, config_json TEXT NOT NULL, config_hash TEXT, saelab_version TEXT, "commit" TEXT,
    hardware_json TEXT, metrics_json TEXT, f1 REAL, mcc REAL, explained_variance REAL, l0 REAL)"""


def make_old_store(path: Path) -> None:
    with sqlite3.connect(path) as con:
        con.execute(OLD_TABLE)
        con.execute(
            "INSERT INTO runs (protocol, arch, l0_target, seed, status, started_at, finished_at, config_json, "
            "metrics_json, f1) VALUES ('mini', 'topk', 12, 0, 'complete', '2026-01-01T00:00:00+00:00', "
            "'2026-01-01T01:00:00+00:00', '{}', '{\"f1\": 0.5, \"dead_latents\": 3}', 0.5)"
        )
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    con.close()


def columns(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [r[1] for r in con.execute("PRAGMA table_info(runs)")]
    finally:
        con.close()


def test_column_list_matches_the_created_table(tmp_path):
    ResultsStore(tmp_path / "r.sqlite")
    assert columns(tmp_path / "r.sqlite") == list(_COLUMNS)


def test_older_store_gets_its_missing_columns_when_opened_for_writing(tmp_path):
    path = tmp_path / "old.sqlite"
    make_old_store(path)
    store = ResultsStore(path)  # before training: a result can no longer be lost at the end of it
    assert set(columns(path)) == set(_COLUMNS)
    run_id = store.start_run("mini", "batchtopk", 12, 1, ENV)
    store.finish_run(run_id, METRICS, wall_seconds=1.0)  # wrote dead_latents/uniqueness: failed before the upgrade
    old, new = store.runs()
    assert old["status"] == "complete" and old["f1"] == 0.5 and old["dead_latents"] is None
    assert new["status"] == "complete" and new["dead_latents"] == 2 and new["uniqueness"] == 0.98
    assert [r["arch"] for r in store.leaderboard(include_reference=False)] == ["batchtopk", "topk"]
    ResultsStore(path)  # opening again (already upgraded) changes nothing
    assert set(columns(path)) == set(_COLUMNS)


def test_older_store_is_read_as_is_by_read_commands(tmp_path):
    path = tmp_path / "old.sqlite"
    make_old_store(path)
    before = path.read_bytes()
    (row,) = ResultsStore(path, create=False).runs()
    assert row["status"] == "complete" and row["hostname"] is None and row["metrics"]["dead_latents"] == 3
    (board,) = ResultsStore(path, create=False).leaderboard(include_reference=False)
    assert board["dead_latents_mean"] == 3
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.sqlite"]


def test_a_runs_table_without_the_core_columns_is_refused_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (run_id INTEGER PRIMARY KEY, score REAL)")
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    con.close()
    before = path.read_bytes()
    for create in (True, False):
        with pytest.raises(FileFormatError, match="not a saelab results store") as err:
            ResultsStore(path, create=create)
        assert str(path) in str(err.value) and "protocol" in str(err.value)
    assert path.read_bytes() == before


def test_a_read_only_opened_store_refuses_writes(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path)
    with pytest.raises(ConfigError, match="read-only"):
        ResultsStore(path, create=False).start_run("mini", "topk", 12, 0, ENV)


# -------------------------------------------------------------------------------------- corrupt files
@pytest.fixture(scope="module")
def filled_bytes(tmp_path_factory) -> bytes:
    """A store a few pages long (so truncation can cut through the data), written once."""
    path = tmp_path_factory.mktemp("filled") / "results.sqlite"
    ResultsStore(path)
    con = sqlite3.connect(path)
    with con:  # one transaction: ResultsStore would fsync every run
        con.executemany(
            "INSERT INTO runs (protocol, arch, l0_target, seed, status, started_at, config_json, metrics_json, f1) "
            "VALUES ('mini', 'topk', 12, ?, 'complete', '2026-01-01T00:00:00+00:00', ?, '{}', 0.5)",
            [(seed, json.dumps({"pad": "x" * 400})) for seed in range(200)],
        )
    con.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["header-only", "first-page", "half", "page-one-garbage"])
@pytest.mark.parametrize("create", [True, False], ids=["write", "read"])
def test_truncated_or_corrupt_store_is_a_one_line_error_naming_it(tmp_path, filled_bytes, damage, create):
    path = tmp_path / "results.sqlite"
    data = filled_bytes
    assert len(data) > 16384
    if damage == "header-only":
        data = data[:100]
    elif damage == "first-page":
        data = data[:4096]
    elif damage == "half":
        data = data[: len(data) // 2]
    else:
        data = data[:16] + os.urandom(84) + data[100:]
    path.write_bytes(data)
    with pytest.raises(FileFormatError) as err:
        store = ResultsStore(path, create=create)
        store.runs()  # a truncation past the schema only shows when the rows are read
        store.leaderboard()
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_corrupt_store_through_the_cli_is_one_error_line(tmp_path, filled_bytes, capsys):
    path = tmp_path / "results.sqlite"
    path.write_bytes(filled_bytes[:200])
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--store", str(path), "--json"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and str(path) in err
    assert len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------- read-only media
READER = """
import json, sys
from saelab.bench import ResultsStore
from saelab.cli import main
from saelab.errors import ConfigError, SaelabError

path, out_dir, ro_dir = sys.argv[1:4]
report = {}
store = ResultsStore(path, create=False)
report["runs"] = [r["status"] for r in store.runs()]
report["board"] = [r["arch"] for r in store.leaderboard(include_reference=False)]
try:
    ResultsStore(path)
    report["write_open"] = "opened"
except ConfigError as err:
    report["write_open"] = str(err)
for name, argv in {
    "list": ["results", "--store", path, "--json"],
    "export": ["results", "--store", path, "export", "--format", "csv", "--out", out_dir + "/runs.csv"],
    "export_ro": ["results", "--store", path, "export", "--format", "csv", "--out", ro_dir + "/runs.csv"],
}.items():
    try:
        main(argv)
    except SystemExit as exit:
        report[name] = exit.code
print(json.dumps(report))
"""


def run_with_read_only(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv with `folder` read-only: a read-only bind mount in a private mount namespace when root (chmod does
    not stop root), permissions otherwise. Skips where neither is possible."""
    env = {**os.environ, "PYTHONPATH": SRC}
    if os.geteuid() != 0:
        paths = [folder, *folder.iterdir()]
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        finally:
            for p in paths:
                p.chmod(modes[p])
    if not shutil.which("unshare"):
        pytest.skip("no unshare to make a read-only mount")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" || exit 97; exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(folder), *argv], capture_output=True, text=True, env=env, timeout=120
    )
    if proc.returncode == 97 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    return proc


def test_wal_store_on_read_only_media_is_readable_and_not_writable(tmp_path):
    media, out_dir = tmp_path / "media", tmp_path / "out"
    media.mkdir()
    out_dir.mkdir()
    path = media / "results.sqlite"
    store = ResultsStore(path)
    for arch, seed in (("batchtopk", 0), ("batchtopk", 1), ("topk", 0)):
        store.finish_run(store.start_run("mini", arch, 12, seed, ENV), METRICS, wall_seconds=1.0)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert sorted(p.name for p in media.iterdir()) == ["results.sqlite"]  # no -shm: SQLite would need to create it

    proc = run_with_read_only(
        media, [sys.executable, "-c", textwrap.dedent(READER), str(path), str(out_dir), str(media)]
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["runs"] == ["complete"] * 3 and report["board"] == ["batchtopk", "topk"]
    assert "store=" in report["write_open"] and str(path) in report["write_open"]
    assert report["list"] == 0 and report["export"] == 0 and report["export_ro"] == 2
    assert len((out_dir / "runs.csv").read_text().splitlines()) == 4
    assert "out=" in proc.stderr and str(media / "runs.csv") in proc.stderr
    assert sorted(p.name for p in media.iterdir()) == ["results.sqlite"]


BENCH = """
import sys
from saelab.bench.protocols import PROTOCOLS, Protocol
PROTOCOLS["tiny"] = Protocol(name="tiny", data=sys.argv[1], width=32, samples=4_000, batch_size=256, lr=3e-3,
                             l0_sweep=(3,), natural_l0=3, seeds=1, eval_samples=2000)
if __name__ == "__main__":
    from saelab.cli import main
    main(sys.argv[2:])
"""


def test_bench_with_a_store_on_read_only_media_fails_before_training(tmp_path, tiny_synthetic_model_dir):
    media, out_dir = tmp_path / "media", tmp_path / "runs"
    media.mkdir()
    path = media / "results.sqlite"
    ResultsStore(path)
    proc = run_with_read_only(
        media,
        [
            sys.executable,
            "-c",
            textwrap.dedent(BENCH),
            str(tiny_synthetic_model_dir),
            "bench",
            "--protocol",
            "tiny",
            "--arch",
            "batchtopk",
            "--store",
            str(path),
            "--out",
            str(out_dir),
        ],
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: store=") and str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()  # no run folder: nothing trained


# -------------------------------------------------------------------------------------- export / plot --out
@pytest.fixture
def filled(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    for seed in range(2):
        store.finish_run(store.start_run("mini", "topk", 12, seed, ENV), METRICS, wall_seconds=1.0)
    return store


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_export_and_plot_out_that_cannot_be_written_is_one_error_line(filled, tmp_path, capsys):
    store = str(filled.path)
    folder = tmp_path / "a_folder.csv"
    folder.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for args in (
        ["export", "--format", "csv", "--out", str(folder)],
        ["export", "--leaderboard", "--format", "md", "--out", str(folder)],
        ["export", "--format", "json", "--out", str(blocker / "sub" / "runs.json")],
        ["plot", "--out", str(blocker / "f1.png")],
    ):
        code, err = cli(capsys, "results", "--store", store, *args)
        assert code == 2 and err.startswith("error: out=") and len(err.strip().splitlines()) == 1, (args, err)
    assert folder.is_dir() and not any(folder.iterdir()) and blocker.read_text() == "x"
    plot_folder = tmp_path / "f1.png"
    plot_folder.mkdir()
    code, err = cli(capsys, "results", "--store", store, "plot", "--out", str(plot_folder))
    assert code == 2 and "is a folder" in err
    rows = filled.runs(status="complete")
    with pytest.raises(ConfigError, match="is a folder"):
        export_runs(rows, folder, "csv")
    with pytest.raises(ConfigError, match="is a folder"):
        export_leaderboard(filled.leaderboard(), folder, "csv")
    with pytest.raises(ConfigError, match="is a file"):
        plot_f1_vs_l0(filled.leaderboard(), blocker / "x.png")


def test_export_replaces_an_existing_file_and_creates_missing_folders(filled, tmp_path, capsys):
    target = tmp_path / "runs.csv"
    target.write_text("old\n")
    code, err = cli(capsys, "results", "--store", str(filled.path), "export", "--format", "csv", "--out", str(target))
    assert code == 0, err
    assert target.read_text().startswith("run_id,") and len(target.read_text().splitlines()) == 3
    nested = tmp_path / "new" / "deeper" / "board.md"
    code, err = cli(
        capsys,
        "results",
        "--store",
        str(filled.path),
        "export",
        "--leaderboard",
        "--format",
        "md",
        "--out",
        str(nested),
    )
    assert code == 0, err
    assert nested.read_text().startswith("| source")
