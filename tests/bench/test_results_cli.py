"""`saelab results ...` through typer's CliRunner, on a real store file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from saelab.bench import ResultsStore
from saelab.errors import ConfigError, FileFormatError

try:  # all command modules; a colleague's unfinished module must not block these tests
    from saelab.cli import _register

    _register()
except Exception:  # noqa: BLE001
    pass
import saelab.cli.results  # noqa: E402,F401  (registers `results` if _register does not yet)
from saelab.cli import app  # noqa: E402

runner = CliRunner()
JSON_KEYS = {
    "arch",
    "l0_target",
    "seed",
    "f1",
    "mcc",
    "explained_variance",
    "l0",
    "dead_latents",
    "wall_seconds",
    "status",
    "run_id",
}


def invoke(*args, **kw):
    return runner.invoke(app, list(args), env={"COLUMNS": "220", **kw.pop("env", {})}, **kw)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    env = {"config": {"samples": 100}, "config_hash": "h", "commit": "abc"}
    for arch, l0, seed, f1 in [("batchtopk", 20, 0, 0.8), ("batchtopk", 20, 1, 0.84), ("matryoshka", 25, 0, 0.9)]:
        run_id = store.start_run("16k", arch, l0, seed, env)
        store.finish_run(
            run_id,
            {"f1": f1, "mcc": 0.7, "explained_variance": 0.79, "l0": float(l0), "dead_latents": 2, "uniqueness": 0.98},
            wall_seconds=12.5,
        )
    dead_pid = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    store.start_run("16k", "standard", 20, 0, env, pid=dead_pid)  # killed part-way
    failed = store.start_run("mini", "topk", 10, 0, env)
    store.fail_run(failed, "boom")
    return path


def json_lines(output):
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_list_runs_json(store_path):
    result = invoke("results", "--store", str(store_path), "--json")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.output)
    assert len(rows) == 5 and all(JSON_KEYS <= set(r) for r in rows)
    assert [r["status"] for r in rows] == ["complete", "complete", "complete", "incomplete", "failed"]
    assert rows[0]["arch"] == "batchtopk" and rows[0]["f1"] == 0.8 and rows[0]["wall_seconds"] == 12.5

    result = invoke("results", "--store", str(store_path), "--json", "--status", "incomplete")
    assert [r["arch"] for r in json_lines(result.output)] == ["standard"]
    result = invoke(
        "results", "--store", str(store_path), "--json", "--arch", "batchtopk", "--l0", "20", "--protocol", "16k"
    )
    assert [r["seed"] for r in json_lines(result.output)] == [0, 1]
    result = invoke("results", "--store", str(store_path), "--json", "--since", "2999-01-01")
    assert result.exit_code == 0 and json_lines(result.output) == []


def test_list_runs_table_and_env_store(store_path):
    result = invoke("results", env={"SAELAB_STORE": str(store_path)})
    assert result.exit_code == 0, result.output
    assert "matryoshka" in result.output and "incomplete" in result.output and "0.9000" in result.output


def test_missing_store_is_an_error_and_not_created(tmp_path):
    missing = tmp_path / "none.sqlite"
    result = invoke("results", "--store", str(missing))
    assert isinstance(result.exception, FileFormatError) and "no results store" in str(result.exception)
    assert not missing.exists()
    result = invoke("results", "leaderboard", env={"SAELAB_STORE": str(missing)})
    assert isinstance(result.exception, FileFormatError)
    assert not missing.exists()


def test_bad_status_is_a_config_error(store_path):
    result = invoke("results", "--store", str(store_path), "--status", "done")
    assert isinstance(result.exception, ConfigError) and result.exception.field == "status"


def test_leaderboard(store_path):
    result = invoke("results", "leaderboard", "--store", str(store_path), "--json")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.output)
    ours = [r for r in rows if r["source"] == "saelab"]
    assert [(r["arch"], r["l0_target"], r["n_seeds"]) for r in ours] == [("matryoshka", 25, 1), ("batchtopk", 20, 2)]
    assert ours[1]["f1_mean"] == pytest.approx(0.82) and ours[1]["f1_sd"] == pytest.approx(0.0282842712)
    assert sum(r["source"] == "published" for r in rows) == 10  # the killed `standard` run is nowhere

    result = invoke("results", "leaderboard", "--store", str(store_path), "--json", "--no-reference")
    assert {r["source"] for r in json_lines(result.output)} == {"saelab"}

    result = invoke("results", "--store", str(store_path), "leaderboard")  # --store before the sub-command
    assert result.exit_code == 0, result.output
    assert "published" in result.output and "0.8200 ± 0.0283" in result.output and "SAELens docs" in result.output


def test_export_csv_json_md(store_path, tmp_path):
    out = tmp_path / "out" / "runs.csv"
    result = invoke("results", "export", "--store", str(store_path), "--format", "csv", "--out", str(out))
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["arch"] for r in rows] == ["batchtopk", "batchtopk", "matryoshka"]  # complete runs only
    assert [float(r["f1"]) for r in rows] == [0.8, 0.84, 0.9]

    out = tmp_path / "board.json"
    result = invoke(
        "results",
        "export",
        "--store",
        str(store_path),
        "--format",
        "json",
        "--out",
        str(out),
        "--leaderboard",
        "--no-reference",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "leaderboard" and [r["arch"] for r in doc["rows"]] == ["matryoshka", "batchtopk"]

    out = tmp_path / "board.md"
    result = invoke(
        "results", "export", "--store", str(store_path), "--format", "md", "--out", str(out), "--leaderboard"
    )
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0].startswith("| source |")

    result = invoke("results", "export", "--store", str(store_path), "--format", "xml", "--out", str(out))
    assert isinstance(result.exception, ConfigError) and result.exception.field == "format"


def test_plot(store_path, tmp_path):
    out = tmp_path / "plot.png"
    result = invoke(
        "results", "plot", "--store", str(store_path), "--out", str(out), "--protocol", "16k", "--reference"
    )
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    result = invoke(
        "results", "plot", "--store", str(store_path), "--out", str(tmp_path / "p.png"), "--protocol", "nope"
    )
    assert isinstance(result.exception, ConfigError) and result.exception.field == "protocol"
    result = invoke("results", "plot", "--store", str(store_path), "--out", str(tmp_path / "p.jpg"))
    assert isinstance(result.exception, ConfigError) and result.exception.field == "out"
