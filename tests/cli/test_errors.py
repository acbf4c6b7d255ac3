"""Every user mistake is one line on stderr, `error: field=value: reason`, and exit status 2: no traceback.

Each command runs in-process through `saelab.cli.main`, as the `saelab` script does. Invalid input
fails before any training or sampling starts, so these run in well under a second each."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.cli import main

GIB = 2**30


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_error_line(capsys, *args) -> str:
    """Run a command that must fail; return its single stderr line."""
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def tiny(tiny_synthetic_model_dir) -> str:
    return str(tiny_synthetic_model_dir)


@pytest.fixture
def small_train(tiny, tmp_path):
    """A train command that would finish in a second if its arguments were valid."""
    return [
        "train",
        "--data",
        tiny,
        "--arch",
        "batchtopk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "2k",
        "--batch-size",
        "256",
        "--eval-samples",
        "1k",
        "--out",
        str(tmp_path / "run"),
    ]


@pytest.fixture
def limited_memory(monkeypatch):
    # A fixed 16 GiB so the refusal does not depend on the machine running the test.
    monkeypatch.setattr("saelab.memory.available_bytes", lambda device="cpu": 16 * GIB)


def test_backwards_l0_range(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--l0", "20..5")
    assert "l0='20..5'" in line and "STOP ≥ START" in line


def test_huge_width_is_refused_before_allocating(capsys, small_train, limited_memory):
    line = one_error_line(capsys, *small_train, "--width", "2000000000")
    assert line.startswith("error: width=2000000000:") and "memory" in line and "16.0 GiB" in line
    assert not (Path(small_train[-1]) / "saes").exists()


def test_huge_batch_size_is_refused_before_allocating(capsys, small_train, limited_memory):
    line = one_error_line(capsys, *small_train, "--batch-size", "2000000000", "--samples", "4e9")
    assert line.startswith("error: batch_size=2000000000:") and "memory" in line


def test_width_times_batch_too_big_names_batch_size(capsys, small_train, limited_memory):
    # Each alone fits; the [batch, width] pre-activations of one step (2·4 bytes·10⁶·10⁴ = 75 GiB) do not.
    line = one_error_line(capsys, *small_train, "--width", "1000000", "--batch-size", "10000", "--samples", "1e9")
    assert line.startswith("error: batch_size=10000:") and "--width" in line


def test_memory_check_uses_real_free_memory():
    from saelab.memory import available_bytes, check_training_memory

    avail = available_bytes("cpu")
    assert avail is None or avail > 0
    check_training_memory(d_in=24, width=32, batch_size=256, n_saes=1, device="cpu")  # tiny: passes


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 192000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
)
def test_allocation_failures_become_one_line(capsys, small_train, monkeypatch, exc):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr("saelab.runs.run.build_run_saes", boom)
    line = one_error_line(capsys, *small_train)
    assert line.startswith("error: out of memory") and "--batch-size" in line
    if isinstance(exc, RuntimeError):
        assert "178.8 GiB" in line


def test_other_runtime_errors_still_raise(small_train, monkeypatch):
    # Only allocation failures are translated; a bug keeps its traceback.
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("saelab.runs.run.build_run_saes", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(small_train)


@pytest.mark.parametrize(
    "command",
    [
        ["--seed", "99999999999999999999"],
        ["--seed", "-1"],
    ],
)
def test_bad_seed(capsys, small_train, command):
    line = one_error_line(capsys, *small_train, *command)
    assert line.startswith(f"error: seed={command[1]}:") and "4294967295" in line


def test_bad_seed_in_synth_describe(capsys):
    line = one_error_line(capsys, "synth", "describe", "sbw-toy", "--samples", "1k", "--seed", str(2**70))
    assert f"--seed={2**70}" in line


def test_unknown_arch_option(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--option", "bogus=1")
    assert line.startswith("error: option='bogus=1': batchtopk has no option 'bogus'") and "topk_threshold_lr" in line


def test_arch_option_of_the_wrong_type(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--option", "batchtopk.k=abc")
    assert line == "error: option='batchtopk.k=abc': batchtopk.k must be a number, got 'abc'"


def test_arch_option_for_an_arch_not_trained_or_set_elsewhere(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--option", "topk.k=3")
    assert "option='topk.k=3'" in line and "not among the architectures" in line
    line = one_error_line(capsys, *small_train, "--option", "d_sae=5")
    assert "option='d_sae=5'" in line and "--width" in line
    line = one_error_line(capsys, *small_train, "--option", "k=NaN")
    assert "option='k=NaN'" in line and "finite" in line


def test_valid_arch_option_still_trains(capsys, small_train):
    code, out, err = run_cli(capsys, *small_train, "--option", "batchtopk.topk_threshold_lr=0.02", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["l0"] > 0


def _device_cases():
    cases = [("bogus", "is not a device name"), ("cuda:x", "is not a device name")]
    if torch.cuda.is_available():
        cases.append(("cuda:999", "CUDA device(s)"))
    else:
        cases.append(("cuda", "CUDA is not available"))
    return cases


@pytest.mark.parametrize("device,reason", _device_cases())
def test_bad_device_in_every_command(capsys, tiny, tmp_path, device, reason):
    commands = [
        [
            "train",
            "--data",
            tiny,
            "--samples",
            "1k",
            "--batch-size",
            "256",
            "--width",
            "32",
            "--l0",
            "3",
            "--out",
            tmp_path / "r",
        ],
        ["eval", "--sae", tmp_path / "nope", "--data", tiny],
        ["synth", "sample", tiny, "--samples", "10"],
        ["synth", "describe", tiny, "--samples", "10"],
        ["l0", "--data", tiny, "--l0", "3", "--samples", "1k", "--batch-size", "256", "--out", tmp_path / "l"],
        ["diagnose", tmp_path, "--data", tiny],
        ["report", tmp_path, "--out", tmp_path / "r.html"],
        ["bench", "--protocol", "mini", "--no-store", "--out", tmp_path / "b"],
        ["cache", "--model", tmp_path / "m", "--dataset", tmp_path / "d", "--layer", "0", "--out", tmp_path / "c"],
    ]
    for command in commands:
        field = "--device" if command[0] == "synth" else "device"
        line = one_error_line(capsys, *command, "--device", device)
        assert line.startswith(f"error: {field}={device!r}: {reason}"), (command, line)


def test_resolve_device():
    from saelab.devices import resolve_device
    from saelab.errors import ConfigError

    assert resolve_device("cpu") == "cpu" and resolve_device(" cpu ") == "cpu"
    with pytest.raises(ConfigError) as err:
        resolve_device("gpu", field="x")
    assert err.value.field == "x" and err.value.value == "gpu"


def test_out_that_is_a_file(capsys, tiny, tmp_path, small_train):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    line = one_error_line(capsys, *small_train, "--out", existing)
    assert line == f"error: out={str(existing)!r}: is a file; give a folder"
    line = one_error_line(
        capsys, "l0", "--data", tiny, "--l0", "3", "--samples", "1k", "--batch-size", "256", "--out", existing
    )
    assert f"out={str(existing)!r}" in line
    line = one_error_line(capsys, *small_train, "--out", existing / "below")
    assert "is a file, not a folder" in line
    line = one_error_line(capsys, "synth", "sample", tiny, "--samples", "10", "--out", tmp_path)
    assert f"--out={str(tmp_path)!r}" in line and "is a folder" in line
    line = one_error_line(capsys, "synth", "save", "sbw-toy", "--out", existing)
    assert f"--out={str(existing)!r}" in line
    assert existing.read_text() == "keep me"


@pytest.fixture
def list_cfg_sae(tmp_path) -> Path:
    """An SAE folder whose weights are fine but whose cfg.json is a JSON list."""
    from safetensors.torch import save_file

    folder = tmp_path / "sae"
    folder.mkdir()
    save_file(
        {"W_enc": torch.zeros(24, 8), "W_dec": torch.zeros(8, 24), "b_enc": torch.zeros(8), "b_dec": torch.zeros(24)},
        str(folder / "sae_weights.safetensors"),
    )
    (folder / "cfg.json").write_text("[1, 2, 3]")
    return folder


def test_cfg_json_that_is_a_list(capsys, tiny, list_cfg_sae):
    line = one_error_line(capsys, "eval", "--sae", list_cfg_sae, "--data", tiny, "--samples", "1k")
    assert "cfg.json" in line
    line = one_error_line(capsys, "diagnose", list_cfg_sae, "--data", tiny, "--samples", "1k")
    assert "cfg.json" in line


def test_run_json_that_is_binary_junk(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "saes" / "x").mkdir(parents=True)
    (run / "saes" / "x" / "cfg.json").write_text("{}")
    (run / "run.json").write_bytes(b"\xff\xfe\x00junk")
    line = one_error_line(capsys, "diagnose", run)
    assert "run.json" in line
    (run / "run.json").write_text("[1, 2]")
    line = one_error_line(capsys, "diagnose", run)
    assert "run.json" in line and "not a saelab run.json" in line


@pytest.mark.parametrize(
    "code,strerror",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_disk_errors_become_one_line_naming_the_path(capsys, small_train, monkeypatch, code, strerror):
    def full_disk(cfg, run_dir, **kwargs):
        raise OSError(code, strerror, str(Path(run_dir) / "run.json"))

    monkeypatch.setattr("saelab.runs.run_training", full_disk)
    line = one_error_line(capsys, *small_train)
    assert line == f"error: {strerror}: {Path(small_train[-1]) / 'run.json'}"


def test_unexpected_os_errors_keep_their_traceback(small_train, monkeypatch):
    def broken_pipe(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("saelab.runs.run_training", broken_pipe)
    with pytest.raises(OSError, match="Input/output error"):
        main(small_train)


def test_real_write_to_a_read_only_folder(capsys, tiny, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the translation is covered by the monkeypatched tests")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_error_line(capsys, "synth", "sample", tiny, "--samples", "10", "--out", ro / "x.safetensors")
    finally:
        ro.chmod(0o700)
    assert "not writable" in line and str(ro) in line


def test_width_zero_names_width(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--width", "0")
    assert line.startswith("error: width=0:")


@pytest.mark.parametrize("flag,value", [("--width", "abc"), ("--batch-size", "1.5"), ("--seed", "x")])
def test_usage_errors_are_one_line_naming_the_flag(capsys, small_train, flag, value):
    line = one_error_line(capsys, *small_train, flag, value)
    assert line.startswith(f"error: {flag[2:].replace('-', '_')}={value!r}: ")


def test_unknown_flag_is_one_line(capsys, small_train):
    line = one_error_line(capsys, *small_train, "--widht", "3")
    assert "--widht" in line


def test_help_and_success_exit_zero(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "--width" in out


@pytest.mark.parametrize("samples,expected", [("1k", 1000), ("2.5k", 2500), ("1e3", 1000), ("1500", 1500)])
def test_synth_sample_takes_counts_like_train(capsys, tiny, samples, expected):
    code, out, err = run_cli(capsys, "synth", "sample", tiny, "--samples", samples, "--batch-size", "512", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == expected


def test_synth_counts_are_checked(capsys, tiny):
    line = one_error_line(capsys, "synth", "sample", tiny, "--samples", "lots")
    assert line.startswith("error: --samples='lots':")
    line = one_error_line(capsys, "synth", "describe", tiny, "--samples", "0")
    assert line.startswith("error: --samples='0':")


def test_synth_sample_refuses_what_cannot_fit(capsys, tiny, tmp_path, limited_memory):
    # 10¹⁰ samples of 24 floats kept for --out: 1.7 TiB.
    line = one_error_line(capsys, "synth", "sample", tiny, "--samples", "1e10", "--out", tmp_path / "s.safetensors")
    assert line.startswith("error: --samples=10000000000:") and "memory" in line


def _strict_loads(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_print_json_writes_null_for_non_finite_floats(capsys):
    from saelab.cli.common import print_json

    print_json(
        {
            "a": float("nan"),
            "b": [1.0, float("inf"), {"c": -math.inf}],
            "d": np.float32("nan"),
            "e": np.float64(2.5),
            "f": torch.tensor(float("nan")),
            "g": torch.tensor([1.0, float("inf")]),
            "h": np.array([np.nan, 3.0]),
            "i": np.int64(7),
            "j": (1, float("nan")),
            "k": Path("/x"),
            "l": np.bool_(True),
            "m": torch.tensor(3),
        }
    )
    out = capsys.readouterr().out
    assert _strict_loads(out) == {
        "a": None,
        "b": [1.0, None, {"c": None}],
        "d": None,
        "e": 2.5,
        "f": None,
        "g": [1.0, None],
        "h": [None, 3.0],
        "i": 7,
        "j": [1, None],
        "k": "/x",
        "l": True,
        "m": 3,
    }


def test_synth_json_is_strict_json(capsys, tiny, monkeypatch):
    # A non-finite statistic (here forced) prints as null, not NaN.
    import saelab.cli.synth as synth_cli

    real = synth_cli.describe_model
    monkeypatch.setattr(synth_cli, "describe_model", lambda *a, **k: {**real(*a, **k), "mean_abs_cos": float("nan")})
    code, out, err = run_cli(capsys, "synth", "describe", tiny, "--samples", "1k", "--json")
    assert code == 0, err
    assert _strict_loads(out)["mean_abs_cos"] is None
