#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): CUDA tests, bf16 train-step speed, synth-16k
# sampling, one 16k-protocol Matryoshka SAE. Last stdout line: the JSON summary.
#   bash benchmarks/gpu_check.sh [--cpu-smoke] [--budget-minutes 8]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# Without an install (a bare GPU machine with torch), run from the source tree.
if ! "$PY" -c "import saelab" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
exec "$PY" benchmarks/gpu_check.py "$@"
