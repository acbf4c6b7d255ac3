"""run_training and `saelab train`: validation, resume checks, whole history, divergence, signals, kills,
full or read-only disks and stale temp files."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saelab.io as sio
from saelab.cli import main
from saelab.errors import ConfigError, FileFormatError, OutputError, TrainingDivergedError, TrainingInterrupted
from saelab.runs import RunConfig, run_training
from saelab.runs import run as run_module
from saelab.training import checkpoint as ckpt_io
from saelab.training.trainer import TrainConfig, Trainer

SRC = str(Path(__file__).resolve().parents[2] / "src")


def config(model_dir, **overrides):
    base = dict(
        data=str(model_dir),
        arch=["batchtopk"],
        l0=[3],
        width=32,
        samples=256 * 24,
        batch_size=256,
        lr=3e-3,
        eval_samples=2000,
        checkpoint_minutes=0,
    )
    return RunConfig(**{**base, **overrides})


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def weights(run_dir, name="batchtopk-l0_3"):
    return load_file(str(Path(run_dir) / "saes" / name / "sae_weights.safetensors"))


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def temp_files(folder):
    return [p for p in Path(folder).rglob("*") if sio.TEMP_FILE_PATTERN.match(p.name)]


# ----- validation -----------------------------------------------------------------------------------
def test_bad_values_name_their_field(tiny_synthetic_model_dir):
    cases = [
        (dict(samples=100, batch_size=256), "samples=100"),
        (dict(eval_every=-1), "eval_every=-1"),
        (dict(width=0), "width=0"),  # not l0=12.0: width is checked first
        (dict(seed=-1), "seed=-1"),
        (dict(seed=2**64), f"seed={2**64}"),
        (dict(seed=2**32), f"seed={2**32}"),
        (dict(checkpoint_minutes=-1.0), "checkpoint_minutes=-1.0"),
        (dict(checkpoint_every=-5), "checkpoint_every=-5"),
    ]
    for overrides, named in cases:
        with pytest.raises(ConfigError) as info:
            config(tiny_synthetic_model_dir, **overrides)
        assert str(info.value).startswith(named), (overrides, str(info.value))
    with pytest.raises(ConfigError, match="^samples=10:"):
        TrainConfig(samples=10, batch_size=64)
    with pytest.raises(ConfigError, match="^seed="):
        TrainConfig(seed=2**64)
    with pytest.raises(ConfigError, match="^eval_every=-2"):
        Trainer(
            {"a": _tiny_sae()}, _tiny_source(), TrainConfig(samples=64, batch_size=64), eval_every=-2, progress=False
        )
    config(tiny_synthetic_model_dir, seed=2**32 - 1, samples=256, batch_size=256)  # the edges are fine


def _tiny_sae():
    from saelab.training.trainer import build_sae

    return build_sae("topk", d_in=4, d_sae=4, k=1)


def _tiny_source():
    from saelab.data import TensorSource

    return TensorSource(torch.randn(16, 4))


def test_cli_width_zero_names_width(tiny_synthetic_model_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", "--data", str(tiny_synthetic_model_dir), "--width", "0", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "width=0" in err and "l0=" not in err
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tiny_synthetic_model_dir),
        "--width",
        "32",
        "--l0",
        "3",
        "--samples",
        "100",
        "--batch-size",
        "256",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "samples=100" in err


# ----- divergence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["batchtopk", "standard", "jumprelu"])
def test_a_run_that_explodes_stops_and_is_marked_diverged(tiny_synthetic_model_dir, tmp_path, arch):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="diverged by step"):
        run_training(config(tiny_synthetic_model_dir, arch=[arch], lr=1e3), run_dir, progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "diverged" and "diverged" in record["error"]
    assert not (run_dir / "saes").exists()


# ----- interrupt, resume, history -------------------------------------------------------------------
def interrupt_at(monkeypatch, step, sig=signal.SIGINT):
    original = Trainer._train_step

    def train_step(self, state, x_BD):
        if self.step == step and state is next(iter(self.states.values())):
            os.kill(os.getpid(), sig)
        return original(self, state, x_BD)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_interrupted_run_resumes_exactly_with_its_whole_history(tiny_synthetic_model_dir, tmp_path, monkeypatch):
    straight = run_training(config(tiny_synthetic_model_dir), tmp_path / "straight", progress=False)
    assert straight.results
    straight_record = json.loads((tmp_path / "straight" / "run.json").read_text())

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 9)
        with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 10/24.*--resume --out") as info:
            run_training(config(tiny_synthetic_model_dir), run_dir, progress=False)
    assert info.value.exit_code == 130 and "\n" not in str(info.value)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "--resume" in record["hint"] and record["steps"] == 10
    assert (run_dir / "checkpoint" / "checkpoint.json").exists() and not (run_dir / "saes").exists()
    before = ckpt_io.read(run_dir / "checkpoint")["elapsed_seconds"]

    # a change that alters the run is refused, naming the field, before anything is loaded or trained
    for field, value in [
        ("data", str(tmp_path / "other-model-same-width")),
        ("dead_feature_window", 50),
        ("lr", 1e-3),
        ("arch_options", {"batchtopk": {"aux_loss_coefficient": 0.5}}),
        ("samples", 256 * 30),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}=.*differs from the checkpoint"):
            run_training(config(tiny_synthetic_model_dir, **{field: value}), run_dir, resume=True, progress=False)
    # evaluation and checkpoint settings cannot change the weights: allowed
    resumed = run_training(
        config(tiny_synthetic_model_dir, eval_samples=1000, checkpoint_every=7), run_dir, resume=True, progress=False
    )
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and resumed.results
    assert [h["step"] for h in record["history"]] == [h["step"] for h in straight_record["history"]]
    assert record["wall_seconds"] >= before
    assert not (run_dir / "checkpoint").exists()
    assert_same_weights(weights(run_dir), weights(tmp_path / "straight"))


def test_resume_needs_a_checkpoint_and_refuses_an_old_pickle(tiny_synthetic_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="^resume="):
        run_training(config(tiny_synthetic_model_dir), tmp_path / "empty", resume=True, progress=False)
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    marker = tmp_path / "marker"
    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps(_Payload(str(marker))))  # unpickling creates `marker`
    with pytest.raises(FileFormatError, match="old checkpoint format.*could run code"):
        run_training(config(tiny_synthetic_model_dir), run_dir, resume=True, progress=False)
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tiny_synthetic_model_dir),
        "--width",
        "32",
        "--l0",
        "3",
        "--out",
        str(run_dir),
        "--resume",
    )
    assert code == 2 and "old checkpoint format" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----- disks ----------------------------------------------------------------------------------------
def test_read_only_output_fails_before_any_work(tiny_synthetic_model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the output folder was checked")

    monkeypatch.setattr(sio.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(run_module, "open_data", no_data)
    with pytest.raises(OutputError, match="read-only") as info:
        run_training(config(tiny_synthetic_model_dir), tmp_path / "run", progress=False)
    assert str(tmp_path / "run") in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(tiny_synthetic_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="read-only"):
            run_training(config(tiny_synthetic_model_dir), locked / "run", progress=False)
    finally:
        locked.chmod(0o755)


def test_a_full_disk_is_one_line_and_the_saes_come_before_any_checkpoint(
    tiny_synthetic_model_dir, tmp_path, monkeypatch, capsys
):
    writes = []
    original_write = ckpt_io.write
    monkeypatch.setattr(ckpt_io, "write", lambda *a, **k: (writes.append(a[0]), original_write(*a, **k)))
    run_training(config(tiny_synthetic_model_dir), tmp_path / "ok", progress=False)
    assert writes == [] and (tmp_path / "ok" / "saes" / "batchtopk-l0_3" / "cfg.json").exists()

    real_replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith("sae_weights.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(sio.os, "replace", full)
    run_dir = tmp_path / "full"
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tiny_synthetic_model_dir),
        "--arch",
        "batchtopk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "6144",
        "--batch-size",
        "256",
        "--eval-samples",
        "2k",
        "--out",
        str(run_dir),
        "--json",
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: disk full while writing "
        f"{run_dir / 'saes' / 'batchtopk-l0_3' / 'sae_weights.safetensors'} "
        "(No space left on device)"
    ]
    assert temp_files(run_dir) == []


UNSHARE_SCRIPT = r"""
import json, sys
from saelab.errors import OutputError
from saelab.runs import RunConfig, run_training
full_dir, ro_dir, model = sys.argv[1:4]
out = {}
cfg = RunConfig(data=model, arch=["batchtopk"], l0=[3], width=4096, samples=512, batch_size=256, eval_samples=1000)
for key, where in (("full", full_dir + "/run"), ("ro", ro_dir + "/run")):
    try:
        run_training(cfg, where, progress=False)
        out[key] = "no error"
    except OutputError as err:
        out[key] = str(err)
print(json.dumps(out))
"""


def test_real_full_and_read_only_filesystems(tiny_synthetic_model_dir, tmp_path):
    """A 256 KiB tmpfs (the SAE's 800 KB cannot fit) and a read-only one, in a private mount namespace."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("no user+mount namespaces here (unshare -rm / mount tmpfs unavailable)")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    script = tmp_path / "script.py"
    script.write_text(UNSHARE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=256k tmpfs {full} && "
            f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && exec {sys.executable} {script} {full} {ro} "
            f"{tiny_synthetic_model_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["full"].startswith(f"disk full while writing {full}/run/saes/"), out
    assert out["ro"] == f"{ro}/run is read-only: Read-only file system; choose another output folder", out


# ----- stale temp files -----------------------------------------------------------------------------
def test_stale_temp_files_are_removed_when_a_run_starts(tiny_synthetic_model_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "saes" / "x").mkdir(parents=True)
    old = time.time() - 3600
    stale = [
        run_dir / ".run.json.abcd1234.tmp",
        run_dir / "checkpoint" / ".checkpoint.json.k_9zz0aa.tmp",
        run_dir / "checkpoint" / ".tensors-0123456789abcdef.safetensors.a1b2c3d4.tmp",
        run_dir / "saes" / "x" / ".sae_weights.safetensors.qwertyui.tmp",
        run_dir / "checkpoint" / "tensors-0123456789abcdef.safetensors",
    ]  # named by no checkpoint.json
    kept = [run_dir / "notes.tmp", run_dir / ".hidden", run_dir / "saes" / "x" / "mine.txt"]
    for p in stale + kept:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    live = run_dir / ".run.json.zzzz9999.tmp"  # newer than this process: a live writer's
    live.write_bytes(b"x")
    future = time.time() + 3600
    os.utime(live, (future, future))

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the start-up")

    monkeypatch.setattr(run_module, "build_run_saes", stop)
    with pytest.raises(RuntimeError, match="stopped after the start-up"):
        run_training(config(tiny_synthetic_model_dir), run_dir, progress=False)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept + [live])


# ----- subprocesses: kill -9, SIGINT, SIGTERM ---------------------------------------------------------
STEPS = 300  # long enough to still be training when the first checkpoint (step 5) appears, short enough to finish fast


def cli_args(model_dir, run_dir, samples):
    return [
        "train",
        "--data",
        str(model_dir),
        "--arch",
        "batchtopk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        str(samples),
        "--batch-size",
        "64",
        "--lr",
        "3e-3",
        "--eval-samples",
        "2k",
        "--checkpoint-every",
        "5",
        "--out",
        str(run_dir),
        "--json",
    ]


ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(model_dir, run_dir, samples):
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab", *cli_args(model_dir, run_dir, samples)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (run_dir / "checkpoint" / "checkpoint.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    return proc


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float summation order
    yield
    torch.set_num_threads(threads)


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tiny_synthetic_model_dir, tmp_path, capsys, one_thread):
    samples = 64 * STEPS
    run_dir = tmp_path / "killed"
    proc = start(tiny_synthetic_model_dir, run_dir, samples)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert not (run_dir / "saes").exists()
    # resumed by a new process, as a user would: temp files the kill left are older than it, so they go
    resume = subprocess.run(
        [sys.executable, "-m", "saelab", *cli_args(tiny_synthetic_model_dir, run_dir, samples), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resume.returncode == 0, resume.stderr[-2000:]
    code, _, err = run_cli(capsys, *cli_args(tiny_synthetic_model_dir, tmp_path / "straight", samples))
    assert code == 0, err
    assert_same_weights(weights(run_dir), weights(tmp_path / "straight"))
    assert temp_files(run_dir) == [] and not (run_dir / "checkpoint").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_train_with_a_checkpoint_and_one_line(tiny_synthetic_model_dir, tmp_path, capsys, sig, code):
    samples = 64 * STEPS
    run_dir = tmp_path / "run"
    proc = start(tiny_synthetic_model_dir, run_dir, samples)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: training interrupted by {signal.Signals(sig).name} at step "
    )
    assert "--resume --out" in lines[0]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "--resume" in record["hint"]
    step = ckpt_io.read(run_dir / "checkpoint")["step"]
    assert 5 <= step < STEPS and record["steps"] == step
    exit_code, _, err = run_cli(capsys, *cli_args(tiny_synthetic_model_dir, run_dir, samples), "--resume")
    assert exit_code == 0, err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
