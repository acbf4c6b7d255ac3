"""The GPU check: everything saelab needs a GPU to show, in one run that ends within `--budget-minutes`.

1. the CUDA tests (`pytest -m cuda tests/cuda`: they skip without a GPU);
2. train-step samples/s per architecture at 768→4096 in bf16 and fp32 (and SAELens's, when installed);
3. building and sampling `synth-16k` on the GPU;
4. one `16k`-protocol Matryoshka SAE at L0 25, with the largest budget that fits what time is left (200M at
   most: the published budget), scored against the ground truth and recorded in a results store.

Prints progress to stderr and one JSON summary as its last stdout line (also written to $OUT/gpu_check.json
when $OUT is set). `--cpu-smoke` runs the same steps on a tiny configuration on the CPU, so the script is
exercised by the test suite and cannot rot while it waits for a GPU.

    bash benchmarks/gpu_check.sh [--cpu-smoke] [--budget-minutes 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = "batchtopk,matryoshka,jumprelu,standard,matching_pursuit,recipe"


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0), cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        log(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def pytest_counts(text: str) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configuration on the CPU (for the tests)")
    parser.add_argument("--budget-minutes", type=float, default=8.0)
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_minutes * 60

    def left() -> float:
        return deadline - time.monotonic()

    import torch

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    summary: dict = {"mode": "cpu-smoke" if smoke else "gpu", "torch": torch.__version__, "ok": True}
    if not smoke and not torch.cuda.is_available():
        summary.update(ok=False, error="no CUDA GPU visible; use --cpu-smoke on a machine without one")
        print(json.dumps(summary))
        return 1
    from saelab.devices import has_native_bf16

    summary["device"] = torch.cuda.get_device_name(0) if not smoke else "cpu"
    summary["native_bf16"] = has_native_bf16(device)
    precision = "bf16" if summary["native_bf16"] else "fp32"
    py = sys.executable

    # 1. The CUDA tests (all skip on a CPU: the smoke run checks that they are collected and skip cleanly).
    tests = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/cuda"], timeout=left() * 0.3)
    summary["cuda_tests"] = {**pytest_counts(tests.stdout), "exit_code": tests.returncode}

    # 2. Train-step throughput, bf16 (where native) and fp32, saelab and SAELens on the same inputs.
    shape, steps, archs = ("32x64:4", "1", "batchtopk,matryoshka") if smoke else ("768x4096:25", "20", ARCHS)
    precisions = "fp32" if smoke else ",".join(dict.fromkeys([precision, "fp32"]))
    bench = run(
        [py, "benchmarks/bench_training.py", "--json", "--device", device, "--shapes", shape, "--steps", steps]
        + ["--archs", archs, "--precision", precisions]
        + (["--no-saelens"] if smoke else []),
        timeout=left() * 0.3,
    )
    summary["train_step"] = json_lines(bench.stdout)

    # 3. Sampling synth-16k (synth-mini in the smoke run): build time and samples/s.
    data = "synth-mini" if smoke else "synth-16k"
    batches = 3 if smoke else 200
    code = (
        "import json, time, torch\n"
        "from saelab.synthetic import load_source\n"
        f"t = time.perf_counter(); m = load_source({data!r}, device={device!r}); build = time.perf_counter() - t\n"
        "m.sample(1024)\n"
        f"{'torch.cuda.synchronize()' if not smoke else 'pass'}\n"
        f"t = time.perf_counter()\nfor _ in range({batches}): m.sample(1024)\n"
        f"{'torch.cuda.synchronize()' if not smoke else 'pass'}\n"
        f"print(json.dumps({{'data': {data!r}, 'build_seconds': build, "
        f"'samples_per_second': {batches} * 1024 / (time.perf_counter() - t)}}))\n"
    )
    sampled = run([py, "-c", code], timeout=left() * 0.3)
    rows = json_lines(sampled.stdout)
    summary["sampling"] = rows[-1] if rows else {"exit_code": sampled.returncode}

    # 4. One 16k-protocol Matryoshka SAE at L0 25, the largest budget that fits (the mini protocol when smoking).
    rates = [
        r["saelab_samples_per_second"]
        for r in summary["train_step"]
        if r.get("arch") == "matryoshka" and r.get("compute_precision") == precision
    ]
    sample_rate = summary["sampling"].get("samples_per_second") if isinstance(summary["sampling"], dict) else None
    if smoke:
        budget = 20_000
    elif rates and sample_rate:
        per_sample = 1 / rates[0] + 1 / sample_rate
        # What time is left, less the evaluation (1M samples) and start-up, at 70% of the measured rate.
        budget = int(max(0.0, left() - 90) / per_sample * 0.7) // 1_000_000 * 1_000_000
        budget = min(budget, 200_000_000)
    else:
        budget = 0
    summary["matryoshka_16k"] = {"samples": budget}
    if budget >= (20_000 if smoke else 1_000_000):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(os.environ.get("OUT") or tmp)
            cmd = ["-m", "saelab", "bench", "--protocol", "mini" if smoke else "16k", "--arch", "matryoshka"]
            cmd += ["--l0", "4" if smoke else "25", "--samples", str(budget), "--device", device, "--json"]
            cmd += ["--store", str(out / "gpu_check.sqlite"), "--out", str(Path(tmp) / "runs")]
            cmd += ["--eval-samples", "5000"] if smoke else ["--precision", precision]
            trained = run([py, *cmd], timeout=left() - 10)
            runs = [r for r in json_lines(trained.stdout) if r.get("kind") == "run"]
            summary["matryoshka_16k"].update(runs[0] if runs else {"exit_code": trained.returncode})
    else:
        summary["matryoshka_16k"]["skipped"] = "no time left for a useful budget"

    summary["wall_seconds"] = time.monotonic() - started
    summary["ok"] = (
        tests.returncode == 0
        and summary["cuda_tests"]["failed"] == 0
        and bool(summary["train_step"])
        and "samples_per_second" in summary["sampling"]
        and "f1" in summary["matryoshka_16k"]
    )
    text = json.dumps(summary)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
