"""Run test bodies on N gloo processes under torchrun, many per launch.

A torchrun start costs 6-13 s (mostly importing Megatron), so a test module declares its
multi-process cases with `@dist_case(world_size=N)` and `pytest_cases(globals())` turns them
into one pytest test per case. The first such test of a (module, world size) pair launches
torchrun once for all that module's cases of that size; each rank runs the cases in order
and writes a JSON report. Each pytest test then reads its case's entry and fails with every
failing rank's traceback.

After a case fails on any rank, the remaining cases are reported as not run: a rank that
died inside a collective leaves the others waiting, so later results would be unreliable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = int(os.environ.get("MINDSPEED_MM_DIST_TIMEOUT", "900"))

_CASE_ATTR = "_dist_case_world_size"
_results_cache: Dict[tuple, Dict[str, dict]] = {}


def dist_case(world_size: int) -> Callable:
    """Mark a function as a multi-process case run on `world_size` gloo ranks."""

    def mark(fn: Callable) -> Callable:
        setattr(fn, _CASE_ATTR, world_size)
        return fn

    return mark


def _cases_of(namespace: dict) -> Dict[str, Callable]:
    return {name: fn for name, fn in namespace.items() if callable(fn) and hasattr(fn, _CASE_ATTR)}


def _launch(module_file: str, world_size: int, names: List[str]) -> Dict[str, dict]:
    out_dir = tempfile.mkdtemp(prefix="mm_dist_")
    env = dict(os.environ)
    env.setdefault("MINDSPEED_MM_DEVICE", os.environ.get("MINDSPEED_MM_TEST_DEVICE", "cpu"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world_size}",
        __file__, module_file, out_dir, *names,
    ]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    elapsed = time.time() - start
    log_tail = (proc.stdout + proc.stderr)[-6000:]
    results: Dict[str, dict] = {name: {"ranks": {}, "log": log_tail, "elapsed": elapsed} for name in names}
    for rank in range(world_size):
        path = Path(out_dir) / f"rank{rank}.json"
        if not path.exists():
            for name in names:
                results[name]["ranks"][rank] = {"status": "no report", "detail": f"rank {rank} wrote no report"}
            continue
        report = json.loads(path.read_text())
        for name in names:
            results[name]["ranks"][rank] = report.get(name, {"status": "no report", "detail": ""})
    return results


def run_case(module_file: str, namespace: dict, name: str) -> None:
    """Launch (once per module and world size) and assert that `name` passed on every rank."""
    cases = _cases_of(namespace)
    world_size = getattr(cases[name], _CASE_ATTR)
    key = (module_file, world_size)
    if key not in _results_cache:
        names = [n for n, fn in cases.items() if getattr(fn, _CASE_ATTR) == world_size]
        _results_cache[key] = _launch(module_file, world_size, names)
    result = _results_cache[key][name]
    bad = {r: v for r, v in result["ranks"].items() if v.get("status") != "passed"}
    if bad:
        lines = [f"case {name} on {world_size} ranks:"]
        for rank, v in sorted(bad.items()):
            lines.append(f"--- rank {rank}: {v.get('status')}\n{v.get('detail', '')}")
        if all(v.get("status") == "no report" for v in bad.values()):
            lines.append(f"--- launcher output (tail):\n{result['log']}")
        pytest.fail("\n".join(lines), pytrace=False)


def pytest_cases(namespace: dict) -> Callable:
    """Build one parametrized pytest test covering every @dist_case in `namespace`."""
    module_file = namespace["__file__"]
    names = sorted(_cases_of(namespace))

    @pytest.mark.distributed
    @pytest.mark.parametrize("case", names)
    def test_distributed(case: str) -> None:
        run_case(module_file, namespace, case)

    return test_distributed


# ---- inside torchrun ---------------------------------------------------------------------


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_dist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(module_file: str, out_dir: str, names: List[str]) -> None:
    import torch
    import torch.distributed as dist

    from mindspeed_mm.runtime import initialize_distributed

    torch.set_num_threads(1)
    initialize_distributed(timeout_minutes=5)
    rank = dist.get_rank()
    module = _load_module(module_file)
    report: Dict[str, dict] = {}
    failed_case: Optional[str] = None
    for name in names:
        if failed_case is not None:
            report[name] = {"status": "not run", "detail": f"an earlier case ({failed_case}) failed"}
            continue
        try:
            getattr(module, name)()
            status, detail = "passed", ""
        except Exception:
            status, detail = "failed", traceback.format_exc()
        report[name] = {"status": status, "detail": detail}
        flag = torch.tensor([1.0 if status != "passed" else 0.0])
        try:
            dist.all_reduce(flag)
        except Exception:
            flag = torch.tensor([1.0])
        if flag.item() > 0:
            failed_case = name
            if status == "passed":
                report[name] = {"status": "passed", "detail": "(another rank failed)"}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    from mindspeed_mm.runtime import destroy_runtime

    destroy_runtime()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
