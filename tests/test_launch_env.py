"""examples/stepvideo/launch_env.sh, through the launchers that source it: the default DataLoader worker count.

The launchers run with `torchrun` and `nproc` replaced by stubs on PATH, so no job starts and the core count is the
test's: each test reads the torchrun command line a launcher builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ["examples/stepvideo/t2v/pretrain_t2v.sh", "examples/stepvideo/i2v/pretrain_i2v.sh",
             "examples/stepvideo/feature_extract/feature_extraction.sh",
             "examples/stepvideo/feature_extract/feature_extraction_i2v.sh"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUM_WORKERS", "NPUS_PER_NODE", "GPUS_PER_NODE", "NNODES", "NODE_RANK")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launcher_args(tmp_path: Path, script: str, cores: int, **env) -> List[str]:
    """The torchrun command line `script` builds on a node where `nproc` says `cores`; its stderr is the last item."""
    stubs = tmp_path / f"stubs{cores}"
    stubs.mkdir(exist_ok=True)
    (stubs / "torchrun").write_text('#!/bin/sh\necho "torchrun $*"\n')
    (stubs / "nproc").write_text(f"#!/bin/sh\necho {cores}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    run_env = _env(LOG_DIR=tmp_path / "logs", **env)
    run_env["PATH"] = os.pathsep.join([str(stubs), run_env["PATH"]])
    proc = subprocess.run(["bash", script], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("torchrun "))
    return line.split() + [proc.stderr]


def _workers(args: List[str]) -> int:
    return int(args[args.index("--num-workers") + 1])


@pytest.mark.parametrize("script", LAUNCHERS)
def test_default_num_workers_is_lowered_to_the_cores_per_process(tmp_path, script):
    # The launcher's default 8 on a node with enough cores for every process.
    assert _workers(_launcher_args(tmp_path, script, cores=64, NPUS_PER_NODE=8)) == 8
    assert _workers(_launcher_args(tmp_path, script, cores=64, GPUS_PER_NODE=8)) == 8
    # Fewer cores: each of the node's processes gets its share, at least 1, with a notice.
    args = _launcher_args(tmp_path, script, cores=2, NPUS_PER_NODE=1)
    assert _workers(args) == 2 and "notice: --num-workers 2 (the launcher's default 8" in args[-1]
    assert _workers(_launcher_args(tmp_path, script, cores=16, NPUS_PER_NODE=4)) == 4
    assert _workers(_launcher_args(tmp_path, script, cores=16, GPUS_PER_NODE=4)) == 4
    assert _workers(_launcher_args(tmp_path, script, cores=2, NPUS_PER_NODE=4)) == 1
    # An explicit NUM_WORKERS is kept as it is, above the cores or 0.
    args = _launcher_args(tmp_path, script, cores=2, NPUS_PER_NODE=1, NUM_WORKERS=6)
    assert _workers(args) == 6 and "notice" not in args[-1]
    assert _workers(_launcher_args(tmp_path, script, cores=2, NPUS_PER_NODE=1, NUM_WORKERS=0)) == 0


def test_dpo_launcher_keeps_its_default_of_no_workers(tmp_path):
    args = _launcher_args(tmp_path, "examples/stepvideo/t2v/posttrain_t2v_dpo.sh", cores=1, NPUS_PER_NODE=1)
    assert _workers(args) == 0 and "notice" not in args[-1]


def test_the_real_core_count_ignores_omp_num_threads(tmp_path):
    """Without the stub: GNU nproc obeys OMP_NUM_THREADS, which would make every launch started with
    OMP_NUM_THREADS=1 use 1 worker; the count is the cores this shell may run on (os.sched_getaffinity: taskset,
    cpusets)."""
    env = _env(NPUS_PER_NODE=1, OMP_NUM_THREADS=1, OMP_THREAD_LIMIT=1, LOG_DIR=tmp_path / "logs")
    script = f"source {REPO / 'examples/stepvideo/launch_env.sh'} >/dev/null && default_num_workers 1000"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(os.sched_getaffinity(0))
