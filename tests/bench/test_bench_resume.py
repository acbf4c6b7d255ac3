"""`saelab bench --resume`: a bench killed mid-run continues from its checkpoints, does not retrain the seeds
that finished, and ends with the same results as a bench that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from saelab.bench.store import ResultsStore
from tests.bench.conftest import run_cli

# The bench runs in a child process (so it can be killed hard); one thread, so the uninterrupted and the resumed
# runs add floats in the same order and their results can be compared exactly.
DRIVER = """
import sys, torch
torch.set_num_threads(1)
from saelab.bench.protocols import PROTOCOLS, Protocol
PROTOCOLS["tiny"] = Protocol(name="tiny", data=sys.argv[1], width=32, samples=300_000, batch_size=256, lr=3e-3,
                             l0_sweep=(3,), natural_l0=3, seeds=2, eval_samples=2000)
from saelab.cli import main
main(sys.argv[2:])
"""


def _bench(model_dir, out, store, *extra):
    return [
        sys.executable,
        "-c",
        DRIVER,
        str(model_dir),
        "bench",
        "--protocol",
        "tiny",
        "--arch",
        "batchtopk",
        "--seeds",
        "2",
        "--checkpoint-every",
        "20",
        "--out",
        str(out),
        "--store",
        str(store),
        "--json",
        *extra,
    ]


def _runs(stdout: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["seed"]: r for r in lines if r["kind"] == "run"}


def _wait_for(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"bench ended before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_bench_killed_mid_seed_resumes_to_the_uninterrupted_result(tiny_synthetic_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        _bench(tiny_synthetic_model_dir, tmp_path / "a", tmp_path / "a.sqlite"),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    expected = _runs(straight.stdout)
    assert sorted(expected) == [0, 1]

    out, store = tmp_path / "b", tmp_path / "b.sqlite"
    proc = subprocess.Popen(
        _bench(tiny_synthetic_model_dir, out, store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Seed 0 finishes first (seeds run one after another); seed 1's first checkpoint is written at step 20.
        _wait_for(out, proc)
        seed1 = None
        deadline = time.monotonic() + 120
        while seed1 is None:
            found = list(out.glob("tiny-*-seed1/checkpoint/checkpoint.json"))
            seed1 = found[0].parent.parent if found else None
            assert proc.poll() is None and time.monotonic() < deadline, "bench ended before seed 1's checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no handler runs: only what the checkpoints hold survives
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    seed0 = seed1.with_name(seed1.name.replace("seed1", "seed0"))
    assert json.loads((seed0 / "run.json").read_text())["status"] == "complete"
    seed0_written = (seed0 / "run.json").stat().st_mtime_ns

    resumed = subprocess.run(
        _bench(tiny_synthetic_model_dir, out, store, "--resume"), capture_output=True, text=True, env=env, check=True
    )
    got = _runs(resumed.stdout)
    assert sorted(got) == [0, 1]
    for seed in (0, 1):
        for key in ("f1", "mcc", "l0", "explained_variance", "dead_latents"):
            assert got[seed][key] == pytest.approx(expected[seed][key], rel=1e-6, abs=1e-9), (seed, key)
    # Seed 0 was not trained again: its folder is untouched and the store holds one finished row for it.
    assert (seed0 / "run.json").stat().st_mtime_ns == seed0_written
    assert sorted(p.name for p in out.iterdir()) == sorted([seed0.name, seed1.name])
    rows = ResultsStore(store).runs(protocol="tiny")
    complete = sorted(r["seed"] for r in rows if r["status"] == "complete")
    assert complete == [0, 1]
    # The killed seed's row says which run continued it.
    killed = [r for r in rows if r["status"] == "incomplete"]
    assert len(killed) == 1 and "continued by run" in killed[0]["error"]


def test_resume_without_a_matching_bench_names_the_difference(tiny, tmp_path, capsys):
    base = ["bench", "--protocol", "tiny", "--arch", "batchtopk", "--out", str(tmp_path / "o"), "--no-store"]
    code, _, err = run_cli(capsys, *base, "--resume")
    assert code == 2 and "resume=" in err and "no interrupted" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing was started
    code, _, _ = run_cli(capsys, *base)
    assert code == 0
    # A different L0 is another bench: resuming it is refused, naming the setting that differs.
    code, _, err = run_cli(capsys, *base, "--l0", "4", "--resume")
    assert code == 2 and "l0" in err
    # The same options again: everything finished, so --resume trains nothing and reports the stored result.
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    code, out, _ = run_cli(capsys, *base, "--resume", "--json")
    assert code == 0 and '"kind": "run"' in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
