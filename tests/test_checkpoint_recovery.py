"""A save killed at any step leaves a folder the next run resumes from and saves into; nothing is re-saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.training.checkpointing import recover_interrupted_save
from tests.helpers.training_fixtures import write_training_configs

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    paths = write_training_configs(root / "w", samples=4)
    paths_file = root / "paths.json"
    paths_file.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return root, paths_file


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_sigkill_at_every_step_of_a_save_is_recovered(configs, ckpt_format):
    """The dangerous save: iteration 1 saved again over the complete iter_0000001 that the tracker names. Killed
    before each of its filesystem steps, the folder must still resume (from iteration 1) and take the next save
    with no leftovers. The old save left the tracker naming a missing folder after a kill between its two
    renames, and a stale .iter_N.old that broke every later save of that iteration."""
    root, paths_file = configs
    work = root / f"overwrite_{ckpt_format}"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.save_kill_driver", str(work), "overwrite",
                           str(paths_file), ckpt_format], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    killed = [r for r in results if r["killed"]]
    # mkdirs, the model file, the optimizer file, renames, the tracker, the old copy's removal
    assert len(killed) >= 7, results
    assert not results[-1]["killed"], "the last attempt should have completed the save unharmed"
    for r in results:
        assert r["recover_status"] == 0, r
        assert r["tracker"] == "2" and r["leftovers"] == [], r
        assert len(r["resumed"]) == 1 and "at iteration 1 " in r["resumed"][0], r


def _complete(folder: Path, name: str) -> None:
    (folder / name / "mp_rank_00").mkdir(parents=True)
    (folder / name / "mp_rank_00" / "model_optim_rng.pt").write_text("x")


def test_recovery_rules(tmp_path):
    """The three leftovers: an incomplete .tmp (deleted), an .old beside its new copy (deleted), an .old whose
    new copy never arrived (restored), and the tracker's temporary file (deleted)."""
    _complete(tmp_path, "iter_0000002")
    _complete(tmp_path, ".iter_0000002.old")
    _complete(tmp_path, ".iter_0000004.old")
    _complete(tmp_path, ".iter_0000004.tmp")
    (tmp_path / ".latest_checkpointed_iteration.txt.tmp").write_text("4")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    messages = []
    recover_interrupted_save(tmp_path, log=messages.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000004",
                                                          "latest_checkpointed_iteration.txt"]
    assert any("restored" in m and "iter_0000004" in m for m in messages)


def test_resume_at_the_last_iteration_does_not_save_again(configs, tmp_path):
    """--train-iters equal to the tracker's iteration: nothing to train, and the complete folder is not rewritten
    (re-saving it is what exposed the kill window)."""
    from tests.helpers.training_fixtures import train_argv

    _, paths_file = configs
    paths = {k: Path(v) for k, v in json.loads(paths_file.read_text()).items()}
    save = tmp_path / "save"
    argv = [sys.executable, str(REPO / "pretrain_sora.py")]
    proc = subprocess.run(argv + train_argv(paths, save, iters=2), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (save / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").stat()
    proc = subprocess.run(argv + train_argv(paths, save, iters=2, extra=["--load", str(save)]), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already saved complete" in proc.stdout and "saved checkpoint" not in proc.stdout
    after = (save / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
