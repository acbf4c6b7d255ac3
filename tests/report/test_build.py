"""`saelab report` on real runs and stores: the sections it shows, what it omits and why, partial sources, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.bench.store import ResultsStore
from saelab.cli import main
from saelab.errors import ConfigError, FileFormatError
from saelab.report import SECTION_IDS, build_report, load_report_source

GT_SECTIONS = ("leaderboard", "tradeoff", "features", "dictionary")
EVAL_SAMPLES = 10_000  # re-evaluation samples per report: enough for every plot, cheap on 2 cores


def section_html(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', text, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def assert_self_contained(text: str) -> None:
    # no external resource of any kind: every src is inline data, no stylesheet/script links, no fetches
    assert not re.search(r'\b(?:src|href)="(?:https?:)?//', text)
    assert "<link" not in text and "@import" not in text and "fetch(" not in text
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_run_folder_report_has_every_section(report_run_dir, tmp_path):
    out = tmp_path / "report.html"
    result = build_report(report_run_dir, out, eval_samples=EVAL_SAMPLES)
    assert result.shown == list(SECTION_IDS) and result.omitted == {} and result.partial == []
    text = out.read_text()
    assert_self_contained(text)
    assert result.images == text.count("<img ") == 7  # trade-off, features, 2 dictionary, sweep, training, geometry
    for sid in SECTION_IDS:
        section_html(text, sid)
    board = section_html(text, "leaderboard")
    # all six SAEs of the run beside the ten published 16k rows, in a sortable table
    assert board.count('class="published"') == 10 and 'class="sortable"' in board
    for arch in ("batchtopk", "matryoshka"):
        for l0 in (2, 3, 4):
            assert f"{arch}-l0_{l0}" in board
    run = json.loads((report_run_dir / "run.json").read_text())
    best = max(run["results"], key=lambda r: r["f1"])
    assert f'data-v="{best["f1"]}"' in board  # the sort key is the exact stored value
    sweep = section_html(text, "l0-sweep")
    assert "Recommended L0 <b>" in sweep and "true L0 of the first 32 features" in sweep
    prov = section_html(text, "provenance")
    for value in (run["commit"], run["saelab_version"], run["config_hash"], "cpu_count", "wall time"):
        assert str(value) in prov
    assert "PARTIAL" not in text and 'id="partial"' not in text
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not the private 0600 of a temp file


def test_store_report_uses_the_best_runs_folder(report_store, tmp_path):
    out = tmp_path / "store.html"
    result = build_report(report_store, out, eval_samples=EVAL_SAMPLES)
    assert result.shown == list(SECTION_IDS), result.omitted
    runs = ResultsStore(report_store, create=False).runs(status="complete")
    assert len(runs) == 8
    text = out.read_text()
    assert_self_contained(text)
    board = section_html(text, "leaderboard")
    # one row per (arch, L0) with mean ± sd over the two seeds
    assert board.count(">saelab · tiny<") == 4 and "<small>± " in board
    best = max(runs, key=lambda r: r["f1"])
    prov = section_html(text, "provenance")
    assert f"run {best['run_id']} (the best F1)" in prov and best["metrics"]["run_dir"] in prov
    # the per-feature plots are of the best SAE of each architecture
    feats = section_html(text, "features")
    assert best["metrics"]["name"] in feats


def test_store_without_run_folders_omits_what_needs_weights(report_store, tmp_path):
    store = ResultsStore(tmp_path / "moved.sqlite")
    for run in ResultsStore(report_store, create=False).runs(status="complete"):
        rid = store.start_run(
            run["protocol"],
            run["arch"],
            run["l0_target"],
            run["seed"],
            {
                "config": run["config"],
                "saelab_version": run["saelab_version"],
                "commit": run["commit"],
                "hardware": run["hardware"],
            },
        )
        store.finish_run(rid, {**run["metrics"], "run_dir": str(tmp_path / "gone")}, run["wall_seconds"])
    result = build_report(store.path, tmp_path / "r.html", eval_samples=EVAL_SAMPLES)
    assert {"leaderboard", "tradeoff", "provenance"} <= set(result.shown)
    for sid in ("features", "dictionary", "geometry", "l0-sweep"):
        assert sid in result.omitted
    assert "not on this machine" in result.omitted["features"]
    text = (tmp_path / "r.html").read_text()
    assert 'id="omitted"' in text and "not on this machine" in section_html(text, "dictionary")


def test_killed_run_is_reported_as_partial(report_run_dir, tmp_path):
    run = json.loads((report_run_dir / "run.json").read_text())
    killed = tmp_path / "killed"
    shutil.copytree(report_run_dir / "saes" / "batchtopk-l0_2", killed / "saes" / "batchtopk-l0_2")
    shutil.copytree(report_run_dir / "saes" / "batchtopk-l0_3", killed / "saes" / "batchtopk-l0_3")
    # what run_training leaves when killed after saving two SAEs: status "running", no results yet
    (killed / "run.json").write_text(
        json.dumps(
            {k: v for k, v in run.items() if k not in ("results", "history", "wall_seconds")} | {"status": "running"}
        )
    )
    result = build_report(killed, tmp_path / "k.html", eval_samples=EVAL_SAMPLES)
    assert any("still running" in p for p in result.partial)
    text = (tmp_path / "k.html").read_text()
    assert 'id="partial"' in text and "PARTIAL" in text
    # the saved SAEs still get the sections that need no ground-truth scores
    assert {"l0-sweep", "geometry", "provenance"} <= set(result.shown)
    assert "stopped before its final evaluation" in result.omitted["leaderboard"]
    assert "training" in result.omitted


def test_unfinished_store_rows_are_reported_as_partial(report_store, tmp_path):
    path = tmp_path / "partial.sqlite"
    shutil.copy(report_store, path)
    store = ResultsStore(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    env = {"config": {"run": {"data": "x"}}, "saelab_version": "0.1.0", "commit": "c", "hardware": {}}
    store.start_run("tiny", "batchtopk", 8, 0, env, pid=dead.pid)  # its process is gone: incomplete
    failed = store.start_run("tiny", "jumprelu", 8, 0, env)
    store.fail_run(failed, "TrainingDivergedError: loss became nan")
    result = build_report(path, tmp_path / "p.html", eval_samples=EVAL_SAMPLES)
    joined = " ".join(result.partial)
    assert "is incomplete" in joined and "is failed" in joined and "loss became nan" in joined
    assert result.shown == list(SECTION_IDS)  # the complete runs are still fully reported
    assert 'id="partial"' in (tmp_path / "p.html").read_text()


def _no_ground_truth_copy(run_dir: Path, dest: Path, **config) -> Path:
    """A run as one on real-model activations records it: no ground-truth scores; the config names activation
    files or a model (its `data` keeps the unused default)."""
    shutil.copytree(run_dir, dest)
    record = json.loads((dest / "run.json").read_text())
    record["config"].update({"data": "synth-mini", **config})
    gt = {"f1", "precision", "recall", "accuracy", "mcc", "uniqueness", "true_l0"}
    record["results"] = [{k: v for k, v in r.items() if k not in gt} for r in record["results"]]
    (dest / "run.json").write_text(json.dumps(record))
    return dest


def test_run_without_ground_truth_shows_only_what_needs_none(report_run_dir, report_model_dir, tmp_path):
    import numpy as np

    from saelab.synthetic import load_source

    acts = tmp_path / "acts.npy"
    np.save(acts, load_source(str(report_model_dir)).sample(4096).numpy())
    real = _no_ground_truth_copy(report_run_dir, tmp_path / "real", activations=[str(acts)])
    result = build_report(real, tmp_path / "real.html", eval_samples=EVAL_SAMPLES)
    assert set(result.shown) == {"l0-sweep", "training", "geometry", "provenance"}
    assert set(result.omitted) == set(GT_SECTIONS) and result.partial == []
    assert all("ground truth" in why for why in result.omitted.values())
    text = (tmp_path / "real.html").read_text()
    sweep = section_html(text, "l0-sweep")
    assert "Recommended L0" in sweep and "true L0 of the first" not in sweep  # no ground truth, no true L0
    geometry = section_html(text, "geometry")
    assert "s_n^dec" in geometry and "need input activations" not in geometry

    # trained straight from a language model: not re-run here, so weights-only measures and the reason for the rest
    lm = _no_ground_truth_copy(report_run_dir, tmp_path / "lm", model="/models/gpt2", layer=6)
    result = build_report(lm, tmp_path / "lm.html", eval_samples=EVAL_SAMPLES)
    assert {"geometry", "training", "provenance"} <= set(result.shown)
    assert "real-model activations (model /models/gpt2)" in result.omitted["l0-sweep"]
    assert "model folder /models/gpt2 is not on this machine" in section_html(
        (tmp_path / "lm.html").read_text(), "geometry"
    )


def _write_run_json(folder: Path, record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("missing", FileFormatError, "does not exist"),
        ("empty-folder", FileFormatError, "empty folder"),
        ("other-folder", FileFormatError, "has no run.json"),
        ("empty-file", FileFormatError, "empty file"),
        ("not-sqlite", FileFormatError, "not an SQLite file"),
        ("empty-run-json", FileFormatError, "is empty"),
        ("bad-json", FileFormatError, "not valid JSON"),
        ("no-envelope", FileFormatError, "lacks the envelope key.*commit"),
        ("future-version", FileFormatError, "written by saelab 7.2.0, incompatible"),
        ("future-format", FileFormatError, "format_version=2"),
        ("bad-status", ConfigError, "status='paused'"),
        ("empty-store", FileFormatError, "empty results store"),
        ("future-store", FileFormatError, "schema version 99"),
    ],
)
def test_bad_input_is_a_clear_error(case, exc, match, report_run_dir, tmp_path):
    record = json.loads((report_run_dir / "run.json").read_text())
    source = {
        "missing": lambda: tmp_path / "nope",
        "empty-folder": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "other-folder": lambda: _other_folder(tmp_path / "o"),
        "empty-file": lambda: (tmp_path / "e.sqlite").touch() or tmp_path / "e.sqlite",
        "not-sqlite": lambda: (tmp_path / "n.sqlite").write_text("hello") and tmp_path / "n.sqlite",
        "empty-run-json": lambda: _write_run_json(tmp_path / "r", ""),
        "bad-json": lambda: _write_run_json(tmp_path / "r", '{"config": {'),
        "no-envelope": lambda: _write_run_json(
            tmp_path / "r", {"config": record["config"], "saelab_version": "0.1.0", "hardware": {}, "time": "t"}
        ),
        "future-version": lambda: _write_run_json(tmp_path / "r", {**record, "saelab_version": "7.2.0"}),
        "future-format": lambda: _write_run_json(tmp_path / "r", {**record, "format_version": 2}),
        "bad-status": lambda: _write_run_json(tmp_path / "r", {**record, "status": "paused"}),
        "empty-store": lambda: ResultsStore(tmp_path / "s.sqlite").path,
        "future-store": lambda: _future_store(tmp_path / "f.sqlite"),
    }[case]()
    with pytest.raises(exc, match=match):
        load_report_source(source)
    with pytest.raises(exc, match=match):
        build_report(source, tmp_path / "out.html")
    assert not (tmp_path / "out.html").exists()  # nothing half-written


def _other_folder(path: Path) -> Path:
    (path / "something").mkdir(parents=True)
    return path


def _future_store(path: Path) -> Path:
    ResultsStore(path)
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    return path


def test_bad_options(report_run_dir, tmp_path):
    with pytest.raises(ConfigError, match="out='.*report.png'"):
        build_report(report_run_dir, tmp_path / "report.png")
    with pytest.raises(ConfigError, match="eval_samples=0"):
        build_report(report_run_dir, tmp_path / "r.html", eval_samples=0)


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli(report_run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.html"
    monkeypatch.setattr(sys, "argv", ["saelab", "report", str(report_run_dir), "--out", str(out)])
    code, stdout, err = run_cli(
        capsys, "report", str(report_run_dir), "--out", str(out), "--eval-samples", "5k", "--json"
    )
    assert code in (0, None), err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["shown"] == list(SECTION_IDS) and line["images"] == 7 and Path(line["path"]) == out
    assert f"saelab report {report_run_dir}" in out.read_text()  # the footer names the command
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing"), "--out", str(out))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "report", str(report_run_dir), "--out", str(out), "--eval-samples", "lots")
    assert code == 2 and "eval_samples='lots'" in err


def test_corrupt_sae_folder_is_reported_not_fatal(report_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_run_dir, run)
    weights = run / "saes" / "matryoshka-l0_4" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as a full disk leaves it
    result = build_report(run, tmp_path / "c.html", eval_samples=EVAL_SAMPLES)
    assert any("matryoshka-l0_4 could not be loaded" in p and "truncated or corrupt" in p for p in result.partial)
    assert result.shown == list(SECTION_IDS)  # the other five SAEs carry every section
    assert 'id="partial"' in (tmp_path / "c.html").read_text()
