"""Feature extraction end to end on a tiny download: files, names, skips, resume, and the feature dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mindspeed_mm.config import load_config
from mindspeed_mm.config.data import MMDataConfig
from mindspeed_mm.data import build_dataset, collate
from tests.helpers.pipeline_fixtures import feature_argv, write_configs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "mindspeed_mm" / "tools" / "feature_extraction" / "get_sora_feature.py"


def _run(argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=600)


def _check_features(paths, task, stdout):
    assert "2 rows" in stdout and "1 skipped: unreadable video" in stdout and "2 extracted" in stdout
    rows = [json.loads(line) for line in (paths["save"] / "data.jsonl").read_text().splitlines()]
    # Equal basenames in different folders get different files; the corrupt video is left out.
    assert [r["file"] for r in rows] == ["features/videos_a_1_mp4.pt", "features/videos_b_1_mp4.pt"]
    assert rows[1]["captions"] == ["一只猫", "a cat"]
    z = paths["sections"]["ae"]["z_channels"]
    for row in rows:
        data = torch.load(paths["save"] / row["file"], weights_only=True)
        assert data["video"].shape == (3, z, 2, 2)  # 17 frames at 32 x 32 -> 3 latents of 2 x 2
        llm, clip = data["prompt_ids"]
        assert llm.shape == (1, 320, 64) and clip.shape == (1, 77, 32)
        assert [m.shape for m in data["prompt_mask"]] == [(1, 320), (1, 77)]
        assert data["prompt_mask"][0].dtype == torch.int64 and data["prompt_mask"][0][0, 0] == 1
        if task == "i2v":
            cond = data["image_latents"]
            assert cond.shape == data["video"].shape and cond[0].abs().sum() > 0 and torch.all(cond[1:] == 0)
        else:
            assert "image_latents" not in data
    return rows


def test_feature_extraction_writes_loadable_features(tmp_path):
    paths = write_configs(tmp_path, "t2v")
    proc = _run(feature_argv(paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _check_features(paths, "t2v", proc.stdout)
    z = paths["sections"]["ae"]["z_channels"]

    # The feature dataset of the pretraining config reads them back.
    feature_cfg = {"dataset_param": {"dataset_type": "feature", "basic_parameters": {
        "data_path": str(paths["save"] / "data.jsonl"), "data_folder": str(paths["save"])}}}
    (tmp_path / "feature_data.json").write_text(json.dumps(feature_cfg))
    dataset = build_dataset(load_config(MMDataConfig, str(tmp_path / "feature_data.json"), "--mm-data"))
    batch = collate([dataset[0], dataset[1]])
    assert batch["video"].shape == (2, 3, z, 2, 2)
    assert [p.shape for p in batch["prompt_ids"]] == [(2, 320, 64), (2, 77, 32)]

    # A second run keeps what exists instead of recomputing it.
    before = {r["file"]: (paths["save"] / r["file"]).stat().st_mtime_ns for r in rows}
    proc = _run(feature_argv(paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 kept from an earlier run" in proc.stdout
    assert before == {r: (paths["save"] / r).stat().st_mtime_ns for r in before}


def test_i2v_launcher_script_runs_under_torchrun(tmp_path):
    """The seed's launcher, unchanged in structure, with its JSON paths pointed at a tiny i2v setup."""
    import socket

    paths = write_configs(tmp_path, "i2v")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MM_DATA=str(paths["data"]), MM_MODEL=str(paths["model"]), MM_TOOL=str(paths["tools"]),
               LOG_DIR=str(tmp_path / "logs"), MASTER_PORT=str(port), NUM_WORKERS="0", MINDSPEED_MM_DEVICE="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))  # torchrun
    proc = subprocess.run(["bash", "examples/stepvideo/feature_extract/feature_extraction_i2v.sh"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _check_features(paths, "i2v", proc.stdout)
    assert len(list((tmp_path / "logs").glob("feature_i2v_*.log"))) == 1


def test_feature_extraction_refuses_model_parallel(tmp_path):
    paths = write_configs(tmp_path, "t2v")
    argv = feature_argv(paths)
    argv[argv.index("--tensor-model-parallel-size") + 1] = "2"
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--global-batch-size", "1"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO), WORLD_SIZE="2"), timeout=600)
    assert proc.returncode != 0
    assert proc.returncode == 2 and "error: feature extraction runs data parallel only" in proc.stderr
    assert "Traceback" not in proc.stderr
