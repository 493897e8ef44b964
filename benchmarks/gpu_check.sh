#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CPU-vs-GPU embedding agreement, extraction against
# the decode-bound limit (the default encoder and one per encoder family), head training and a
# 100-trial search, as one table; needs no network.
# Uses .venv if `make test` or `make demo` made one, else the python on PATH (with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PYTHONPATH=. exec timeout 600 "$PYTHON" -m benchmarks.gpu_check "$@"
