"""End-to-end: `saelab train`, `eval`, `bench` (incl. a user architecture) and `results` on a tiny model."""

import json
from pathlib import Path

import pytest

from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.cli import main
from saelab.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_synthetic_model_dir) -> Path:
    return tiny_synthetic_model_dir


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_train_then_eval_json(tiny_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tiny_model_dir),
        "--arch",
        "batchtopk",
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "60k",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--eval-samples",
        "8k",
        "--out",
        str(run_dir),
        "--json",
    )
    assert code == 0, err
    (line,) = json_lines(out)
    for key in (
        "f1",
        "precision",
        "recall",
        "mcc",
        "uniqueness",
        "explained_variance",
        "l0",
        "dead_latents",
        "samples_per_second",
        "run_dir",
    ):
        assert key in line
    assert 0.0 < line["f1"] <= 1.0 and 0.5 < line["explained_variance"] <= 1.0
    assert abs(line["l0"] - 3) < 1.0  # the JumpReLU threshold reproduces the trained L0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["saelab_version"] and record["commit"]
    assert not (run_dir / "checkpoint.pt").exists()
    sae_dir = run_dir / "saes" / "batchtopk-l0_3"
    code, out, err = run_cli(
        capsys, "eval", "--sae", str(sae_dir), "--data", str(tiny_model_dir), "--samples", "8k", "--json"
    )
    assert code == 0, err
    (ev,) = json_lines(out)
    assert ev["f1"] == pytest.approx(line["f1"], abs=0.05)


def test_train_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", "--data", str(tiny_model_dir), "--arch", "nope", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "arch='nope'" in err and "batchtopk" in err
    code, _, err = run_cli(
        capsys, "train", "--data", str(tiny_model_dir), "--l0", "50", "--width", "32", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "l0=50.0" in err
    code, _, err = run_cli(
        capsys, "train", "--data", str(tiny_model_dir), "--samples", "lots", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "samples='lots'" in err
    code, _, err = run_cli(capsys, "train", "--data", "no-such-preset", "--out", str(tmp_path / "r"))
    assert code == 2 and "no-such-preset" in err


@pytest.fixture
def tiny_protocol(tiny_model_dir, monkeypatch):
    proto = Protocol(
        name="tiny",
        data=str(tiny_model_dir),
        width=32,
        samples=40_000,
        batch_size=256,
        lr=3e-3,
        l0_sweep=(2, 3),
        natural_l0=3,
        seeds=2,
        eval_samples=4000,
        lr_decay_fraction=1 / 3,
    )
    monkeypatch.setitem(PROTOCOLS, "tiny", proto)
    return proto


def test_bench_records_every_run_and_summarises(tiny_protocol, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    store = tmp_path / "results.sqlite"
    code, out, err = run_cli(
        capsys,
        "bench",
        "--protocol",
        "tiny",
        "--arch",
        "batchtopk",
        "--arch",
        "tanh_sae:TanhSAE",
        "--l0",
        "2",
        "3",
        "--seeds",
        "2",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "b"),
        "--json",
    )
    assert code == 0, err
    lines = json_lines(out)
    results = [r for r in lines if not r.get("summary")]
    summaries = [r for r in lines if r.get("summary")]
    assert len(results) == 2 * 2 * 2 and len(summaries) == 4
    for r in results:
        assert set(
            ("arch", "l0_target", "seed", "f1", "mcc", "explained_variance", "l0", "dead_latents", "wall_seconds")
        ) <= set(r)
    bt = [r["f1"] for r in results if r["arch"] == "batchtopk" and r["l0_target"] == 2]
    (s,) = [r for r in summaries if r["arch"] == "batchtopk" and r["l0_target"] == 2]
    assert s["f1_mean"] == pytest.approx(sum(bt) / 2)
    assert s["f1_sd"] == pytest.approx(abs(bt[0] - bt[1]) / 2**0.5)
    code, out, err = run_cli(capsys, "results", "--store", str(store), "--json")
    assert code == 0, err
    stored = json_lines(out)
    assert len(stored) == 8 and all(r["status"] == "complete" for r in stored)


def test_bench_rejects_a_class_that_is_not_an_sae(tiny_protocol, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--arch", "tanh_sae:TanhSAEConfig", "--no-store")
    assert code == 2 and "not a subclass" in err
    code, _, err = run_cli(capsys, "bench", "--protocol", "nope", "--no-store")
    assert code == 2 and "protocol='nope'" in err


def test_multi_value_l0_ranges_expand():
    from saelab.cli.common import expand_multi_value_args

    assert expand_multi_value_args(["l0", "--l0", "5..8", "--arch", "a,b"]) == [
        "l0",
        "--l0",
        "5",
        "--l0",
        "6",
        "--l0",
        "7",
        "--l0",
        "8",
        "--arch",
        "a",
        "--arch",
        "b",
    ]
    assert expand_multi_value_args(["--l0", "4..12:4"]) == ["--l0", "4", "--l0", "8", "--l0", "12"]
    with pytest.raises(ConfigError):
        expand_multi_value_args(["--l0", "9..3"])


def test_bench_ablate_trains_the_recipe_and_each_ablation(tiny_protocol, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        capsys,
        "bench",
        "--protocol",
        "tiny",
        "--ablate",
        "recipe",
        "--samples",
        "8k",
        "--no-store",
        "--out",
        str(tmp_path / "b"),
        "--json",
    )
    assert code == 0, err
    results = [r for r in json_lines(out) if not r.get("summary")]
    from saelab.saes.recipe import RecipeSAE

    assert [r["arch"] for r in results] == ["recipe"] + [f"recipe-no_{c}" for c in RecipeSAE.ablations]
    assert all(0 <= r["f1"] <= 1 for r in results)
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--ablate", "batchtopk", "--no-store")
    assert code == 2 and "ablate='batchtopk'" in err


def test_bench_jobs_runs_seeds_in_parallel_workers_with_the_same_results(tiny_protocol, tmp_path, capsys):
    runs = {}
    for jobs in (1, 2):
        store = tmp_path / f"jobs{jobs}.sqlite"
        code, out, err = run_cli(
            capsys,
            "bench",
            "--protocol",
            "tiny",
            "--arch",
            "batchtopk",
            "--seeds",
            "2",
            "--samples",
            "20k",
            "--jobs",
            str(jobs),
            "--store",
            str(store),
            "--out",
            str(tmp_path / f"b{jobs}"),
            "--json",
        )
        assert code == 0, err
        runs[jobs] = {r["seed"]: r for r in json_lines(out) if not r.get("summary")}
        code, out, err = run_cli(capsys, "results", "--store", str(store), "--json")
        assert [r["status"] for r in json_lines(out)] == ["complete", "complete"]
    assert sorted(runs[1]) == sorted(runs[2]) == [0, 1]
    for seed in (0, 1):  # same seeds, same configs; only thread counts differ (float summation order)
        assert runs[2][seed]["f1"] == pytest.approx(runs[1][seed]["f1"], abs=0.03)
        assert runs[2][seed]["explained_variance"] == pytest.approx(runs[1][seed]["explained_variance"], abs=0.01)
    code, _, err = run_cli(capsys, "bench", "--protocol", "tiny", "--jobs", "0", "--no-store")
    assert code == 2 and "jobs=0" in err
