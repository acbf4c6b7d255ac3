"""Issue 20, the command line a newcomer meets: progress while working, tables that fit their medium, --json
everywhere, help without typer's placeholders, one-line messages, and a `saelab --help` that imports no torch."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.markup import escape
from rich.table import Table

from saelab.cli import _register, app, main
from saelab.errors import ConfigError
from saelab.training.progress import (
    PROGRESS_SECONDS_ENV,
    TrainingProgress,
    progress_label,
    progress_line,
    progress_seconds,
)
from tests.bench.conftest import install_tiny_protocol, run_cli

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def tiny(tiny_synthetic_model_dir, monkeypatch):
    return install_tiny_protocol(tiny_synthetic_model_dir, monkeypatch, samples=8192, tiers={})


def command_paths() -> list[list[str]]:
    """Every command of the typer app, as the words that name it (`["results", "export"]`)."""
    _register()
    paths = []

    def walk(command, path):
        subs = getattr(command, "commands", None)
        if subs:
            if path:  # a group that runs by itself (`saelab results`) is a command too
                callback = getattr(command, "callback", None)
                if callback is not None and getattr(command, "invoke_without_command", False):
                    paths.append(path)
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            paths.append(path)

    walk(typer.main.get_command(app), [])
    return paths


def leaf(path: list[str]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


# ------------------------------------------------------------------------------------------ progress
class _State:
    def __init__(self, **last):
        self.last = last


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_SECONDS_ENV, raising=False)
    assert progress_seconds() == 30.0
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    assert progress_seconds() == 0.0
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(PROGRESS_SECONDS_ENV, bad)
        with pytest.raises(ConfigError, match=PROGRESS_SECONDS_ENV):
            progress_seconds()


def test_progress_line_says_step_rate_eta_and_each_sae():
    lasts = {f"sae{i}": {"loss": 0.01234, "l0": 12.04, "dead_latents": 3} for i in range(5)}
    line = progress_line("seed 1", 1200, 5860, 48210.4, 100.0, lasts)
    assert line.startswith("seed 1: step 1,200/5,860 (20%), 48,210 samples/s, ETA 1.7 min | ")
    assert "sae0: loss 0.0123, train L0 12.0, dead 3" in line and "(+2 more)" in line and "sae3" not in line
    assert progress_line("train", 5860, 5860, 1.0, 0.0, {}).endswith(", done")


def test_plain_lines_follow_the_interval_and_always_end_with_the_last_step(capsys, monkeypatch):
    states = {"a": _State(loss=0.5, l0=4.0, dead_latents=0)}
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "3600")
    with progress_label("seed 7", plain=True):
        bar = TrainingProgress(total=100, enabled=True)
    bar.start(0)
    for step in (50, 99, 100):
        bar.update(step, 1000.0, states)
    bar.stop()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "seed 7: 100 steps to train; a progress line every 60.0 min"
    assert len(lines) == 2 and lines[1].startswith("seed 7: step 100/100 (100%)") and "done" in lines[1]
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    bar = TrainingProgress(total=100, enabled=True)  # capsys: stderr is not a terminal, so plain lines
    bar.start(40)
    bar.update(50, 1000.0, states)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "train: 60 steps to train (from step 40 of 100); a progress line at every logged step"
    assert lines[1].startswith("train: step 50/100 (50%), 1,000 samples/s, ETA ") and "a: loss 0.5" in lines[1]
    TrainingProgress(total=100, enabled=False).update(100, 1.0, states)
    assert capsys.readouterr().err == ""


def test_train_to_a_file_prints_progress_lines(tiny_synthetic_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    args = ["--data", str(tiny_synthetic_model_dir), "--arch", "batchtopk", "--l0", "3", "--width", "32"]
    args += ["--samples", "30k", "--batch-size", "256", "--eval-samples", "4k", "--out", str(tmp_path / "run")]
    code, out, err = run_cli(capsys, "train", *args)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    # 117 steps, logged every 50 and at the end
    assert lines[0] == "train: 117 steps to train; a progress line at every logged step"
    assert [re.findall(r"^train: step (\d+)/117", line) for line in lines[1:]] == [["50"], ["100"], ["117"]]
    assert "ETA" in lines[1] and "batchtopk-l0_3: loss" in lines[1] and lines[-1].split(" | ")[0].endswith("done")
    assert "batchtopk-l0_3" in out  # the results table, on stdout


def test_bench_jobs_to_a_file_prints_the_estimate_and_each_workers_progress(tiny, tmp_path, capfd, monkeypatch):
    # capfd: stdout and stderr are files, as with `saelab bench ... > file 2>&1`; the spawned workers write to them too
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    args = ["bench", "--protocol", "tiny", "--arch", "batchtopk", "--seeds", "2", "--jobs", "2", "--no-store"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "b")])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("bench: 2 seed(s) × 1 SAE(s), 32 training steps per seed, in 2 worker processes")
    assert any(line.startswith("estimated wall time ~") for line in lines), err
    for seed in (0, 1):
        assert f"seed {seed}: 32 steps to train; a progress line at every logged step" in lines
        assert any(
            re.match(rf"seed {seed}: step 32/32 \(100%\), [\d,]+ samples/s, done \| batchtopk-l0_3", s) for s in lines
        )
    assert "batchtopk" in out and "± " in out  # the summary table


def test_bench_json_stays_quiet_on_stderr(tiny, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "bench", "--protocol", "tiny", "--no-store", "--out", str(tmp_path / "b"), "--json"
    )
    assert code == 0, err
    assert "step" not in err and "estimated" not in err
    assert {json.loads(line)["kind"] for line in out.splitlines()} == {"run", "summary"}


# ------------------------------------------------------------------------------------------ tables
def test_a_console_on_a_file_keeps_every_name_and_row_whole(monkeypatch):
    from saelab.cli.terminal import MediumConsole

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table(title="wide")
    for header in ("arch", *(f"metric {i}" for i in range(12))):
        table.add_column(header)
    name = "matryoshka_with_a_long_variant_name[ista_steps=0,k=24]"
    table.add_row(escape(name), *(f"0.{i:04d} ± 0.0012" for i in range(12)))
    buffer = io.StringIO()
    MediumConsole(file=buffer).print(table)
    text = buffer.getvalue()
    assert "…" not in text
    (row,) = [line for line in text.splitlines() if name in line]
    assert "0.0011 ± 0.0012" in row and len(row) > 200
    monkeypatch.setenv("COLUMNS", "80")  # asked for 80 columns: 80 columns
    buffer = io.StringIO()
    MediumConsole(file=buffer).print(table)
    assert max(len(line) for line in buffer.getvalue().splitlines()) <= 80


def test_results_and_leaderboard_piped_print_full_names(tmp_path, capsys, monkeypatch):
    from saelab.bench.store import ResultsStore

    monkeypatch.delenv("COLUMNS", raising=False)
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    env = {"config": {"samples": 100}, "config_hash": "h", "commit": "abc"}
    archs = ("matryoshka", "recipe[ista_steps=0,unique_threshold=0.5]")
    for arch in archs:
        for seed in (0, 1):
            run_id = store.start_run("mini", arch, 12, seed, env)
            metrics = {"f1": 0.8512 + seed / 100, "mcc": 0.7, "uniqueness": 0.98, "explained_variance": 0.79}
            store.finish_run(run_id, {**metrics, "l0": 12.0, "dead_latents": 2}, wall_seconds=12.5)
    for command in (["results"], ["results", "leaderboard", "--no-reference"]):
        code, out, err = run_cli(capsys, command[0], "--store", str(path), *command[1:])
        assert code == 0, err
        assert "…" not in out
        for arch in archs:
            rows = [line for line in out.splitlines() if arch in line]
            assert rows and all("0.8" in row for row in rows), out  # name and F1 on one line: no wrap
        assert max(len(line) for line in out.splitlines()) > 80


# ------------------------------------------------------------------------------------------ --json
def test_every_command_takes_json():
    paths = command_paths()
    assert ["results", "export"] in paths and ["results", "plot"] in paths and ["train"] in paths
    missing = [" ".join(p) for p in paths if not any("--json" in getattr(q, "opts", ()) for q in leaf(p).params)]
    assert not missing, f"commands without --json: {missing}"


def test_results_export_and_plot_json(tmp_path, capsys):
    from saelab.bench.store import ResultsStore

    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    for seed in (0, 1):
        run_id = store.start_run("mini", "batchtopk", 12, seed, {"config": {}, "config_hash": "h"})
        store.finish_run(run_id, {"f1": 0.8, "mcc": 0.7, "l0": 12.0, "dead_latents": 1}, wall_seconds=1.0)
    csv_path = tmp_path / "runs.csv"
    code, out, err = run_cli(
        capsys, "results", "export", "--store", str(path), "--format", "csv", "--out", str(csv_path), "--json"
    )
    assert code == 0, err
    assert json.loads(out) == {"kind": "export", "path": str(csv_path), "format": "csv", "what": "runs", "rows": 2}
    assert csv_path.exists()
    png = tmp_path / "f1.png"
    code, out, err = run_cli(capsys, "results", "plot", "--store", str(path), "--out", str(png), "--json")
    assert code == 0, err
    line = json.loads(out)
    assert line["kind"] == "plot" and line["path"] == str(png) and line["archs"] == ["batchtopk"] and png.exists()


# ------------------------------------------------------------------------------------------ help
def test_help_shows_plain_placeholders_and_the_architectures(capsys):
    bad = re.compile(r"<\w+\[[^>]*\]>|<bool>|--no-no-|\{\w+\}")
    helps = {}
    for path in command_paths():
        code, out, err = run_cli(capsys, *path, "--help")
        assert code == 0, (path, err)
        helps[" ".join(path)] = out
        found = bad.findall(out)
        assert not found, f"saelab {' '.join(path)} --help shows {found}"
    for command in ("bench", "train", "l0", "compare"):
        assert "Registered: " in helps[command] and "matryoshka" in helps[command], command
    assert "--no-store " in helps["bench"]
    assert "Usage: saelab diagnose [OPTIONS] RUN" in helps["diagnose"]
    assert "lr 3e-4" in helps["train"] and "lr 2e-3" in helps["train"] and "--protocol mini" in helps["train"]


def test_the_command_listing_is_what_the_commands_register(capsys):
    code, listed, _ = run_cli(capsys, "--help")
    assert code == 0
    _register()
    with pytest.raises(SystemExit):
        app(args=["--help"], prog_name="saelab")
    full = capsys.readouterr().out
    assert listed == full, "add the new command to saelab/cli/commands.py (COMMANDS)"


def test_help_imports_no_torch():
    code = (
        "import sys\n"
        "from saelab.cli import main\n"
        "for args in (['--help'], []):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'scipy', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": ""}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert "bench" in proc.stdout and "results" in proc.stdout and "synth" in proc.stdout


# ------------------------------------------------------------------------------------------ messages
def test_eval_on_a_file_says_what_is_wrong(tmp_path, capsys):
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    code, _, err = run_cli(capsys, "eval", "--sae", str(afile), "--samples", "1k")
    assert code == 2 and str(afile) in err and "does not exist" not in err
    assert len(err.strip().splitlines()) == 1


def _saved_sae(tmp_path: Path) -> Path:
    from saelab.saes.registry import get_sae_class
    from saelab.saes.saelens_format import save_sae

    cls = get_sae_class("batchtopk")
    return save_sae(cls(cls.config_class(d_in=8, d_sae=16, k=2)), tmp_path / "sae")  # pyright: ignore[reportCallIssue]


@pytest.mark.parametrize(
    "drop, message",
    [
        (["d_sae"], "required field 'd_sae' is missing"),
        (["d_in", "d_sae"], "required fields 'd_in', 'd_sae' are missing"),
    ],
)
def test_a_cfg_json_missing_fields_names_the_file_and_the_fields(tmp_path, capsys, drop, message):
    folder = _saved_sae(tmp_path)
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for key in drop:
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "eval", "--sae", str(folder), "--samples", "1k")
    assert code == 2 and err.strip() == f"error: {cfg_path}: {message}"


def test_a_config_whose_own_constructor_needs_a_field_still_gets_one_line(tmp_path):
    import dataclasses

    from saelab.errors import FileFormatError
    from saelab.saes.registry import get_sae_class
    from saelab.saes.saelens_format import _build_config

    base = get_sae_class("batchtopk")

    @dataclasses.dataclass(kw_only=True)
    class OwnInit(base.config_class):  # type: ignore[misc,valid-type]
        d_sae: int = 16  # optional as a dataclass field, required by the class's own constructor

        @classmethod
        def from_dict(cls, data):
            def build(*, d_in, d_sae, **rest):
                return cls(d_in=d_in, d_sae=d_sae, **rest)

            return build(**{k: v for k, v in data.items() if k in ("d_in", "d_sae", "k")})

    class Arch(base):  # type: ignore[misc,valid-type]
        config_class = OwnInit

    with pytest.raises(FileFormatError) as info:
        _build_config(tmp_path / "cfg.json", Arch, {"d_in": 8, "k": 2})
    assert str(info.value) == f"{tmp_path / 'cfg.json'}: required field 'd_sae' is missing"


def test_compare_with_bad_jobs_creates_nothing(tmp_path, capsys):
    store, out_dir = tmp_path / "s" / "results.sqlite", tmp_path / "runs"
    args = ["--store", str(store), "--out", str(out_dir), "--no-estimate"]
    for bad in (["--jobs", "0"], ["--seeds", "0"]):
        code, _, err = run_cli(capsys, "compare", "batchtopk", "topk", *args, *bad)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert not store.parent.exists() and not out_dir.exists()
