#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (megatron-core, PyAV) into .whl/ for Python 3.12, so a
# device session can carry them: run(command="bash benchmarks/device_check.sh", carry=[".whl"]). About 38 MB, under
# the 64 MiB a call may carry. benchmarks/device_check.sh installs them there when megatron-core is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl megatron-core==0.16.1 av==18.1.0
ls -la .whl
