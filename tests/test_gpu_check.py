"""`benchmarks/gpu_check.sh --cpu-smoke`: the GPU check's every step on a tiny CPU configuration, so the
script that waits for a GPU machine is known to work when one is lent."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_runs_every_step_and_ends_with_its_json_summary(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--budget-minutes", "10"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "OUT": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "cpu-smoke" and summary["ok"] is True
    # The CUDA tests are collected and skip cleanly without a GPU.
    assert summary["cuda_tests"]["skipped"] > 0 and summary["cuda_tests"]["failed"] == 0
    assert {r["arch"] for r in summary["train_step"]} == {"batchtopk", "matryoshka"}
    assert all(r["saelab_samples_per_second"] > 0 for r in summary["train_step"])
    assert summary["sampling"]["samples_per_second"] > 0
    trained = summary["matryoshka_16k"]
    assert trained["samples"] == 20_000 and 0 <= trained["f1"] <= 1
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == summary
