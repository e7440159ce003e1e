#!/usr/bin/env bash
# The device check on one NVIDIA GPU (benchmarks/device_check.py says what it measures): under 8 minutes, one JSON
# and one markdown table in --out, else $OUT, else device_check_out/.
#   bash benchmarks/device_check.sh                 # on the GPU machine
#   bash benchmarks/device_check.sh --dry --out DIR # on the CPU at tiny sizes (tests/test_device_check.py)
# PYTHON picks the interpreter (default: python, else python3, the one that holds torch on the GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# The GPU machine's image has torch but not megatron-core or PyAV: install the carried wheels of
# benchmarks/device_wheels.sh (.whl/) into a private folder when they are missing.
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
