"""Kill a training run with SIGKILL at each step of a checkpoint save, then check that the next run recovers.

    python -m tests.helpers.save_kill_driver <workdir> <scenario> <paths.json> [torch | torch_dist]

A "step" is a filesystem mutation made while `save_checkpoint` runs in the training process: a mkdir, torch.save
(the model file and the distributed optimizer's file, or torch_dist's common state), a rename, a write or a delete.
(torch_dist's tensor files are written by processes Megatron-core forks; a kill of the trainer at any of the steps
above also lands before, between or after those writes.) For k = 1, 2, ... the driver forks a child
that runs the scenario's killed command and SIGKILLs itself just before its k-th step, then forks another child
that runs the recovery command (the same folder as --load and --save, on to iteration 2). It stops at the first
k that is never reached (the save completed). Children are forked after the imports, so each costs the
training only, not the import of torch and Megatron. Prints one JSON line per k.

Scenarios (the save folder starts as a complete one-iteration run):
  overwrite   a fresh run saves iteration 1 again, over the complete iter_0000001 the tracker names
  new         a resumed run saves iteration 2 next to iteration 1
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys

import torch

from mindspeed_mm.training import checkpointing, train
from tests.helpers.training_fixtures import train_argv

_state = {"active": False, "count": 0, "kill_at": 0, "pid": None}


def _counted(fn):
    def wrapped(*args, **kwargs):
        # Only the training process counts: processes it forks (torch_dist's writers) inherit these wrappers.
        if _state["active"] and os.getpid() == _state["pid"]:
            _state["count"] += 1
            if _state["count"] == _state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped


def _install_kill_points() -> None:
    os.replace = _counted(os.replace)
    shutil.rmtree = _counted(shutil.rmtree)
    torch.save = _counted(torch.save)
    pathlib.Path.write_text = _counted(pathlib.Path.write_text)
    pathlib.Path.mkdir = _counted(pathlib.Path.mkdir)
    original = checkpointing.save_checkpoint

    def save(*args, **kwargs):
        _state["active"] = True
        try:
            return original(*args, **kwargs)
        finally:
            _state["active"] = False
    train.save_checkpoint = save


def _become_subreaper() -> None:
    """Processes a killed child leaves behind (Megatron-core's writer and its multiprocessing manager) become this
    process's children, so `_reap_leftovers` can end them instead of leaving them to init."""
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_leftovers() -> None:
    import psutil

    for proc in psutil.Process().children(recursive=True):
        proc.kill()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)


def _child(argv, kill_at: int, log: pathlib.Path) -> int:
    """Run pretrain(argv) in a forked child; returns its wait status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            _state["kill_at"], _state["pid"] = kill_at, os.getpid()
            train.pretrain(argv)
            code = 0
        except BaseException as exc:  # report and exit: the parent reads the log
            print(f"child failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    _reap_leftovers()
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> int:
    work, scenario, paths_file = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    ckpt_format = sys.argv[4] if len(sys.argv) > 4 else "torch"
    paths = {k: pathlib.Path(v) for k, v in json.loads(paths_file.read_text()).items()}
    _become_subreaper()
    _install_kill_points()
    base = work / "base"
    flags = ["--use-distributed-optimizer", "--save-interval", "1", "--ckpt-format", ckpt_format]
    if _child(train_argv(paths, base, iters=1, extra=flags), 0, work / "base.log") != 0:
        print(json.dumps({"error": "the base run failed", "log": (work / "base.log").read_text()[-2000:]}))
        return 1
    for k in range(1, 100):
        save = work / f"k{k}"
        shutil.copytree(base, save)
        if scenario == "overwrite":
            killed_argv = train_argv(paths, save, iters=1, extra=flags)
        else:
            killed_argv = train_argv(paths, save, iters=2, extra=flags + ["--load", str(save)])
        status = _child(killed_argv, k, work / f"k{k}.killed.log")
        recover = _child(train_argv(paths, save, iters=2, extra=flags + ["--load", str(save)]), 0,
                         work / f"k{k}.recover.log")
        log = (work / f"k{k}.recover.log").read_text()
        leftovers = sorted(p.name for p in save.iterdir() if p.name.startswith("."))
        print(json.dumps({"k": k, "killed": status == -signal.SIGKILL, "killed_status": status,
                          "recover_status": recover, "tracker": (save / "latest_checkpointed_iteration.txt")
                          .read_text().strip(), "leftovers": leftovers,
                          "resumed": [line for line in log.splitlines() if "resumed from" in line],
                          "log_tail": log[-1500:] if recover != 0 else ""}), flush=True)
        if status != -signal.SIGKILL:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
