#!/usr/bin/env bash
# The device check on one NVIDIA GPU (benchmarks/device_check.py says what it measures): under 8 minutes, one JSON
# and one markdown table in --out, else $OUT, else device_check_out/.
#   bash benchmarks/device_check.sh                 # on the GPU machine
#   bash benchmarks/device_check.sh --dry --out DIR # on the CPU at tiny sizes (tests/test_device_check.py)
# PYTHON picks the interpreter (default: python, else python3, the one that holds torch on the GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PYTHON" benchmarks/device_check.py "$@"
