"""`saelab bench --jobs N` as real processes: workers die with the bench however it ends (SIGKILL, SIGTERM, Ctrl-C),
Ctrl-C lists what finished, run folders never collide, and bad options fail before the store is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.cli import main
from saelab.errors import SaelabError

SRC = str(Path(__file__).resolve().parents[2] / "src")
LINUX_PROC = Path("/proc/self/stat").exists()

# Registers a tiny protocol, then runs the CLI; the __main__ guard keeps spawned workers from re-running it.
BENCH_SCRIPT = """
import sys
from saelab.bench.protocols import PROTOCOLS, Protocol
PROTOCOLS["tiny"] = Protocol(name="tiny", data=sys.argv[1], width=32, samples=40_000, batch_size=256, lr=3e-3,
                             l0_sweep=(2, 3), natural_l0=3, seeds=2, eval_samples=4000)
if __name__ == "__main__":
    from saelab.cli import main
    main(sys.argv[2:])
"""


# ------------------------------------------------------------------------------------------ /proc helpers
def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live or zombie process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every process below `pid`."""
    found: dict[int, int] = {}
    frontier = {pid}
    while frontier:
        children = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = proc_stat(int(entry.name))
                if stat and stat[1] in frontier and int(entry.name) not in found:
                    children[int(entry.name)] = stat[2]
        found.update(children)
        frontier = set(children)
    return found


def still_running(pids: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in pids.items():
        stat = proc_stat(pid)
        if stat and stat[0] not in ("Z", "X") and stat[2] == start:  # same process, not a zombie or a reused pid
            alive.append(pid)
    return alive


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def store_rows(store: Path) -> list[dict]:
    from saelab.bench.store import ResultsStore

    try:
        return ResultsStore(store, create=False).runs()
    except SaelabError:  # not created yet
        return []


class Bench:
    """`saelab bench` in its own session (like a shell job), stdout/stderr in files; always cleaned up."""

    def __init__(self, tmp_path: Path, model_dir: Path, *args: str):
        script = tmp_path / "bench_main.py"
        script.write_text(BENCH_SCRIPT)
        self.store = tmp_path / "results.sqlite"
        self.out_dir = tmp_path / "runs"
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        argv = [
            sys.executable,
            str(script),
            str(model_dir),
            "bench",
            "--protocol",
            "tiny",
            "--arch",
            "batchtopk",
            "--store",
            str(self.store),
            "--out",
            str(self.out_dir),
            "--json",
            *args,
        ]
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=err, start_new_session=True, env={**os.environ, "PYTHONPATH": SRC}
            )
        self.seen: dict[int, int] = {}

    def workers_training(self, n: int) -> bool:
        """True once `n` runs are recorded as running by child processes of the bench (mid-training)."""
        kids = descendants(self.proc.pid)
        self.seen.update(kids)
        running = [r for r in store_rows(self.store) if r["status"] == "running" and r["pid"] in kids]
        return len({r["pid"] for r in running}) >= n

    def close(self) -> None:
        for pid in still_running(self.seen):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def bench_factory(tmp_path, tiny_synthetic_model_dir):
    started: list[Bench] = []

    def start(*args: str) -> Bench:
        bench = Bench(tmp_path, tiny_synthetic_model_dir, *args)
        started.append(bench)
        return bench

    yield start
    for bench in started:
        bench.close()


needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="needs /proc to find the worker processes")


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_the_bench(bench_factory, sig):
    bench = bench_factory("--seeds", "2", "--jobs", "2", "--samples", "50M")  # far longer than the test
    assert wait_until(lambda: bench.workers_training(2), timeout=180, interval=0.2), bench.stderr.read_text()
    workers = dict(bench.seen)
    assert len(workers) >= 2
    os.kill(bench.proc.pid, sig)
    rc = bench.proc.wait(timeout=60)
    left = wait_until(lambda: not still_running(workers), timeout=10)
    assert left, f"orphaned workers still running: {still_running(workers)}"
    if sig == signal.SIGTERM:  # the bench stopped its workers itself and said so
        assert rc == 143
        last = bench.stderr.read_text().strip().splitlines()[-1]
        assert last.startswith("error: bench interrupted by SIGTERM: 0 of 2 (arch, L0, seed) runs finished"), last
    else:
        assert rc == -signal.SIGKILL
    # The killed runs are never results.
    assert [r["status"] for r in store_rows(bench.store)] == ["incomplete", "incomplete"]


@needs_proc
@pytest.mark.parametrize("jobs, seeds", [(2, 3), (1, 2)], ids=["workers", "in-process"])
def test_ctrl_c_stops_the_workers_and_lists_what_finished(bench_factory, jobs, seeds):
    # in-process, the trainer catches the signal itself (checkpoint, TrainingInterrupted): the same report follows
    # Long enough that the last seed is still training when the signal lands, even on an idle machine.
    bench = bench_factory("--l0", "2", "3", "--seeds", str(seeds), "--jobs", str(jobs), "--samples", "300k")

    def some_finished_some_running():
        # A seed with a complete run and a seed with only running ones. (Flaky before: one seed's L0 2 row is
        # complete while its L0 3 row is still being evaluated, so a Ctrl-C then left nothing incomplete.)
        bench.seen.update(descendants(bench.proc.pid))
        rows = store_rows(bench.store)
        done = {r["seed"] for r in rows if r["status"] == "complete"}
        running = {r["seed"] for r in rows if r["status"] == "running"}
        return bool(done) and bool(running - done)

    assert wait_until(some_finished_some_running, timeout=240), bench.stderr.read_text()
    workers = dict(bench.seen)
    os.killpg(bench.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    assert bench.proc.wait(timeout=60) == 130, bench.stderr.read_text()
    assert wait_until(lambda: not still_running(workers), timeout=10), still_running(workers)
    lines = bench.stderr.read_text().strip().splitlines()
    listed = {line for line in lines if line.startswith("finished: ")}
    complete = [r for r in store_rows(bench.store) if r["status"] == "complete"]
    assert complete and len(complete) < 2 * seeds
    assert listed == {f"finished: batchtopk L0 {r['l0_target']:g} seed {r['seed']}" for r in complete}
    assert lines[-1].startswith(
        f"error: bench interrupted by SIGINT: {len(complete)} of {2 * seeds} "
        f"(arch, L0, seed) runs finished (stored in {bench.store})"
    )
    assert not any("Traceback" in line for line in lines)
    assert {r["status"] for r in store_rows(bench.store)} == {"complete", "incomplete"}
    assert all(any(d.iterdir()) for d in bench.out_dir.iterdir())  # no empty folder for a seed that never started


# A parent that starts one child using only one of the two mechanisms, then waits to be killed.
_CHILD = """
import sys, time
from saelab.bench import workers
mode, parent = sys.argv[1], int(sys.argv[2])
if mode == "pdeathsig":
    assert workers.set_parent_death_signal()
else:
    workers.watch_parent(parent, interval=0.1)
print("ready", flush=True)
time.sleep(60)
"""
_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1], str(os.getpid())], stdout=subprocess.PIPE,
                         text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(60)
"""


@needs_proc
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_each_guard_alone_ends_an_orphaned_worker(mode):
    if mode == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_PARENT), mode, textwrap.dedent(_CHILD)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    child = {}
    try:
        child_pid = int(parent.stdout.readline())
        child = {child_pid: proc_stat(child_pid)[2]}
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: not still_running(child), timeout=5), f"{mode}: child outlived its parent"
    finally:
        for pid in still_running(child):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.wait()


# ------------------------------------------------------------------------------------------ run folders
def test_two_benches_in_the_same_second_get_their_own_run_folders(tmp_path, monkeypatch, tiny_synthetic_model_dir):
    from saelab.bench import paths
    from saelab.bench.runner import BenchRequest, run_bench

    monkeypatch.setattr(paths.time, "strftime", lambda fmt, *a: "20260101-120000")  # one frozen second
    proto = Protocol(
        name="tiny",
        data=str(tiny_synthetic_model_dir),
        width=32,
        samples=4_000,
        batch_size=256,
        lr=3e-3,
        l0_sweep=(3,),
        natural_l0=3,
        seeds=1,
        eval_samples=2000,
    )
    request = BenchRequest(protocol=proto, archs=["batchtopk"], l0s=[3.0], seeds=[0], out_dir=tmp_path / "b")
    first = run_bench(request, progress=False)
    second = run_bench(request, progress=False)
    (a,), (b,) = first, second
    assert a["run_dir"] != b["run_dir"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(Path(r["run_dir"]).name for r in (a, b))
    for r in (a, b):
        assert Path(r["run_dir"]).name.startswith("tiny-20260101-120000-")
        assert (Path(r["run_dir"]) / "run.json").exists()


def test_a_taken_run_folder_name_is_retried_and_never_shared(tmp_path, monkeypatch):
    from saelab.bench import paths

    monkeypatch.setattr(paths.time, "strftime", lambda fmt, *a: "20260101-120000")
    tags = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(paths.secrets, "token_hex", lambda n: next(tags))
    (tmp_path / "p-20260101-120000-aaaaaa-seed1").mkdir(parents=True)  # another bench took seed 1's name
    first = paths.make_unique_run_dirs(tmp_path, "p", ["-seed0"])
    assert first == "20260101-120000-aaaaaa"
    second = paths.make_unique_run_dirs(tmp_path, "p", ["-seed0", "-seed1"])
    assert second == "20260101-120000-bbbbbb"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p-20260101-120000-aaaaaa-seed0",
        "p-20260101-120000-aaaaaa-seed1",
        "p-20260101-120000-bbbbbb-seed0",
        "p-20260101-120000-bbbbbb-seed1",
    ]


# ------------------------------------------------------------------------------------------ options first
@pytest.fixture
def tiny_protocol(tiny_synthetic_model_dir, monkeypatch):
    proto = Protocol(
        name="tiny",
        data=str(tiny_synthetic_model_dir),
        width=32,
        samples=4_000,
        batch_size=256,
        lr=3e-3,
        l0_sweep=(2, 3),
        natural_l0=3,
        seeds=2,
        eval_samples=2000,
    )
    monkeypatch.setitem(PROTOCOLS, "tiny", proto)
    return proto


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "bad, field",
    [
        (["--jobs", "0"], "jobs=0"),
        (["--jobs", "-1"], "jobs=-1"),
        (["--l0", "20..5"], "l0='20..5'"),
        (["--l0", "0"], "l0='0'"),
        (["--seeds", "0"], "seeds=0"),
        (["--samples", "lots"], "samples='lots'"),
        (["--arch", "nope"], "arch='nope'"),
    ],
)
def test_bad_options_fail_in_one_line_before_the_store_is_touched(tiny_protocol, tmp_path, capsys, bad, field):
    store, out_dir = tmp_path / "s" / "results.sqlite", tmp_path / "runs"
    code, out, err = run_cli(capsys, "bench", "--protocol", "tiny", "--store", str(store), "--out", str(out_dir), *bad)
    assert code == 2 and err.startswith("error: ") and field in err
    assert len(err.strip().splitlines()) == 1
    assert not store.exists() and not store.parent.exists() and not out_dir.exists()


def test_unusable_out_fails_before_the_store_or_any_training(tiny_protocol, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    store = tmp_path / "results.sqlite"
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--store", str(store), "--out", str(blocker / "runs"))
    assert code == 2 and "out=" in err and "a_file" in err and len(err.strip().splitlines()) == 1
    assert not store.exists()
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--store", str(store), "--out", str(blocker))
    assert code == 2 and "out=" in err and "is a file" in err
    assert not store.exists()


def test_unusable_store_fails_before_any_run_folder_or_training(tiny_protocol, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    store = tmp_path / "results.sqlite"
    store.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84)  # the header of a store, then nothing: truncated
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--store", str(store), "--out", str(out_dir))
    assert code == 2 and str(store) in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()
