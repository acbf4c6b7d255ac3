"""`saelab research`: the experiment log under kills and concurrent writers, and init → try → log → rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from saelab.research.log import ExperimentLog
from tests.bench.conftest import run_cli

SRC = str(Path(__file__).resolve().parents[2] / "src")

APPENDER = """
import sys
from saelab.research.log import ExperimentLog
log, who, n = ExperimentLog(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    log.append({"id": f"{who}-{i}", "who": who, "i": i, "note": who * 20000})  # ~20-40 kB lines
"""


def start(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_two_processes_appending_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "log.jsonl"
    procs = [start(APPENDER, str(path), who, "50") for who in ("a", "bb")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    read = ExperimentLog(path).read()
    assert len(read.entries) == 100 and not read.bad_lines and not read.torn_tail
    assert sorted(e["id"] for e in read.entries) == sorted(f"{w}-{i}" for w in ("a", "bb") for i in range(50))
    assert all(e["note"] == e["who"] * 20000 for e in read.entries)  # no line interleaved with another


def test_a_torn_last_line_is_ignored_and_the_next_append_stays_whole(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ExperimentLog(path)
    log.append({"id": "e0001"})
    with open(path, "ab") as f:  # what a writer killed mid-write leaves
        f.write(b'{"id": "e0002", "note": "cut he')
    read = log.read()
    assert [e["id"] for e in read.entries] == ["e0001"] and read.torn_tail
    log.append({"id": "e0003"})
    read = log.read()
    assert [e["id"] for e in read.entries] == ["e0001", "e0003"] and read.bad_lines == [2] and not read.torn_tail


def test_a_writer_killed_mid_loop_leaves_a_readable_log(tmp_path):
    path = tmp_path / "log.jsonl"
    proc = start(APPENDER, str(path), "k", "100000")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 400_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    read = ExperimentLog(path).read()
    assert len(read.entries) >= 5 and not read.bad_lines
    assert [e["i"] for e in read.entries] == list(range(len(read.entries)))  # every entry before the kill, in order
    ExperimentLog(path).append({"id": "after"})
    assert ExperimentLog(path).read().entries[-1]["id"] == "after"


# ------------------------------------------------------------------------------------------------ the loop


def lines(text, kind=None):
    found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [f for f in found if kind is None or f.get("kind") == kind]


def test_scripted_research_loop_init_try_log_rerun(tiny, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, "research", "init", str(ws), "--protocol", "tiny", "--seeds", "2", "--json")
    assert code == 0, err
    (info,) = lines(out, "workspace")
    assert {"TASK.md", "ideas/template.py", "results.sqlite", "log.jsonl"} <= set(info["files"])
    task = (ws / "TASK.md").read_text()
    assert "`quick` | 4,096" in task and "confirmed" in task and "research try ideas/" in task
    code, _, err = run_cli(capsys, "research", "init", str(ws), "--protocol", "tiny")
    assert code == 2 and "already a research workspace" in err

    # The loop a script (or an agent) runs: copy the template, turn its knob, try it beside an option override.
    idea = ws / "ideas" / "fast_k.py"
    idea.write_text((ws / "ideas" / "template.py").read_text().replace("K_START_RATIO = 2.4", "K_START_RATIO = 1.5"))
    monkeypatch.chdir(ws)
    code, out, err = run_cli(
        capsys,
        "research",
        "try",
        "ideas/fast_k.py:Idea",
        "recipe:ista_steps=0",
        "--note",
        "k from 1.5 L0; and no ISTA",
        "--no-estimate",
        "--json",
    )
    assert code == 0, err
    tried = lines(out, "experiment")
    assert [e["id"] for e in tried] == ["e0001", "e0002"]

    code, out, err = run_cli(capsys, "research", "log", str(ws), "--json")
    assert code == 0, err
    logged = lines(out)
    assert logged == tried  # the log holds exactly what try reported
    file_entry, spec_entry = logged
    for e in logged:
        assert e["verdict"] in ("better", "worse", "unresolved") and e["verdict_mcc"] in (
            "better",
            "worse",
            "unresolved",
        )
        assert e["n_seeds"] == 2 and e["config"]["samples"] == 4096 and e["config"]["tier"] == "quick"
        assert e["config"]["base"] == "recipe" and e["config"]["seeds"] == [0, 1] and e["config"]["l0"] == 3.0
        assert e["note"] == "k from 1.5 L0; and no ISTA" and isinstance(e["delta_f1"], float)
        assert json.loads((ws / "experiments" / e["id"] / "entry.json").read_text()) == e
    import hashlib

    assert file_entry["variant"] == "ideas/fast_k.py:Idea"
    assert file_entry["code_hash"] == "sha256:" + hashlib.sha256(idea.read_bytes()).hexdigest()
    assert (ws / file_entry["code"]["copy"]).read_bytes() == idea.read_bytes()
    assert spec_entry["code_hash"] == "sha256:" + hashlib.sha256(b"recipe:ista_steps=0").hexdigest()
    assert spec_entry["arch"] == "recipe[ista_steps=0]" and spec_entry["code"]["copy"] is None

    # The original file is edited (here: broken) after the try; the rerun runs the saved copy from the log alone.
    idea.write_text("raise RuntimeError('edited after the run')\n")
    code, out, err = run_cli(capsys, "research", "rerun", file_entry["id"], "--no-estimate", "--json")
    assert code == 0, err
    (again,) = lines(out, "rerun")
    assert again["id"] == "e0001" and again["code_hash"] == file_entry["code_hash"]
    assert again["delta_f1_logged"] == file_entry["delta_f1"] and again["verdict_logged"] == file_entry["verdict"]
    # same code, config, seeds and positions on one process: the same numbers
    assert again["delta_f1"] == pytest.approx(file_entry["delta_f1"], abs=1e-6)
    assert again["delta_mcc"] == pytest.approx(file_entry["delta_mcc"], abs=1e-6)
    entries = ExperimentLog(ws / "log.jsonl").entries()
    assert [e["id"] for e in entries] == ["e0001", "e0002", again["new_id"]]
    assert entries[-1]["rerun_of"] == "e0001" and entries[-1]["code_hash"] == file_entry["code_hash"]

    code, out, err = run_cli(capsys, "research", "rerun", "e0999", "--no-estimate")
    assert code == 2 and "id='e0999'" in err


TRY_SCRIPT = """
import sys
from saelab.bench.protocols import PROTOCOLS, Protocol
PROTOCOLS["tiny"] = Protocol(name="tiny", data=sys.argv[1], width=32, samples=400_000, batch_size=256, lr=3e-3,
                             l0_sweep=(3,), natural_l0=3, seeds=1, eval_samples=2000)
if __name__ == "__main__":
    from saelab.cli import main
    main(sys.argv[2:])
"""


def test_a_try_killed_mid_run_leaves_the_log_readable(tiny, tmp_path, tiny_synthetic_model_dir, capsys):
    from saelab.bench.store import ResultsStore
    from saelab.research.workspace import init_workspace

    ws, _ = init_workspace(tmp_path / "ws", protocol="tiny", seeds=1)
    ws.log.append({"kind": "experiment", "id": "e0000", "verdict": "unresolved", "note": "before the kill"})
    script = tmp_path / "try_main.py"
    script.write_text(TRY_SCRIPT)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tiny_synthetic_model_dir),
                "research",
                "try",
                "recipe:ista_steps=0",
                "--dir",
                str(ws.root),
                "--samples",
                "400k",
                "--no-estimate",
                "--json",
            ],
            env={**os.environ, "PYTHONPATH": SRC},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine can take a minute just to import torch
        while time.monotonic() < deadline:  # until it is training
            if any(r["status"] == "running" for r in ResultsStore(ws.store_path, create=False).runs()):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the try never started training: {(tmp_path / 'stderr.txt').read_text()}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    code, out, err = run_cli(capsys, "research", "log", str(ws.root), "--json")
    assert code == 0, err
    assert [e["id"] for e in lines(out)] == ["e0000"]  # nothing half-written, nothing lost


def test_ids_are_unique_across_concurrent_reservations(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from saelab.research.workspace import Workspace

    ws = Workspace(tmp_path, {})
    with ThreadPoolExecutor(8) as pool:
        got = [i for ids in pool.map(lambda _: ws.reserve_ids(3), range(8)) for i in ids]
    assert sorted(got) == [f"e{n:04d}" for n in range(1, 25)]


def test_a_result_is_better_at_quick_confirmed_at_full():
    from saelab.research.experiments import confirmed

    def entry(eid, code, tier, verdict, partial=False):
        return {"id": eid, "code_hash": code, "config": {"tier": tier}, "verdict": verdict, "partial": partial}

    entries = [
        entry("e1", "A", "quick", "better"),
        entry("e2", "A", "full", "better"),
        entry("e3", "B", "quick", "better"),
        entry("e4", "B", "full", "unresolved"),
        entry("e5", "C", "quick", "better"),
        entry("e6", "C", "full", "better", partial=True),
    ]
    assert confirmed(entries) == [{"code_hash": "A", "quick": ["e1"], "full": ["e2"]}]
