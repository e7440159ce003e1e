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
from mindspeed_mm.tools.feature_extraction.get_sora_feature import feature_name
from tests.helpers.pipeline_fixtures import feature_argv, write_configs, write_videos

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
    assert [r["file"] for r in rows] == [f"features/{feature_name('videos/a/1.mp4')}",
                                         f"features/{feature_name('videos/b/1.mp4')}"]
    assert rows[0]["file"].startswith("features/videos_a_1_mp4-")
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
    assert [p.shape for p in batch["prompt"]] == [(2, 320, 64), (2, 77, 32)]

    # A second run keeps what exists instead of recomputing it.
    before = {r["file"]: (paths["save"] / r["file"]).stat().st_mtime_ns for r in rows}
    proc = _run(feature_argv(paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 kept from an earlier run" in proc.stdout
    assert before == {r: (paths["save"] / r).stat().st_mtime_ns for r in before}


def test_i2v_launcher_script_runs_under_torchrun(tmp_path):
    """The seed's launcher, unchanged in structure, with its JSON paths pointed at a tiny i2v setup; Step-LLM's
    layers offloaded (text_encoder_layerwise_offload, whose states tests/test_text_encoder.py checks)."""
    import socket

    paths = write_configs(tmp_path, "i2v")
    model = json.loads(paths["model"].read_text())
    paths["model"].write_text(json.dumps(dict(model, text_encoder_layerwise_offload=True)))
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


def test_feature_names_are_injective_and_readable():
    paths = ["videos/a_b.mp4", "videos/a/b.mp4", "videos/a.b.mp4", "videos/a b.mp4", "videos/a-b.mp4"]
    names = [feature_name(p) for p in paths]
    assert len(set(names)) == len(paths)
    assert all(n.startswith("videos_a_b_mp4-") for n in names[:4])
    assert feature_name("./videos//a_b.mp4") == feature_name("videos/a_b.mp4") == names[0]
    long = feature_name("d/" + "x" * 500 + ".mp4")
    assert len(long) <= 100 and long.endswith(".pt")
    assert feature_name("视频/猫.mp4") != feature_name("视频/狗.mp4")  # non-ASCII stems collapse; the hash does not


def _manifest(rows):
    from mindspeed_mm.data import ManifestRow

    out = []
    for line, (file, caption, rejected) in enumerate(rows, start=1):
        row = ManifestRow(line=line, file=file, path=os.path.join("/data", file), captions=[caption])
        if rejected is not None:
            row.file_rejected, row.path_rejected = rejected, os.path.join("/data", rejected)
            row.score, row.score_rejected = 0.9, 0.1
        out.append(row)
    return out


def test_plan_extracts_each_video_once_and_skips_duplicates():
    from mindspeed_mm.tools.feature_extraction.get_sora_feature import plan_extraction

    plan = plan_extraction(_manifest([("videos/a_b.mp4", "x", None), ("videos/a/b.mp4", "y", None),
                                      ("./videos/a_b.mp4", "x", None), ("videos/../videos/a/b.mp4", "z", None),
                                      ("videos/a.b.mp4", "w", None)]), "/data", seed=0)
    assert [v.key for v in plan.videos] == ["videos/a_b.mp4", "videos/a/b.mp4", "videos/a.b.mp4"]
    assert len({v.name for v in plan.videos}) == 3
    assert [p.row.line for p in plan.rows] == [1, 2, 5] and dict(plan.skipped) == {"duplicate video": [3, 4]}
    assert plan.notes[0] == ("line 3: ./videos/a_b.mp4 is the video of line 1, which is extracted once; keep one "
                             "row per video.")


def test_extraction_names_do_not_collide_and_stale_files_are_redone(tmp_path):
    paths = write_configs(tmp_path, "t2v")
    data = tmp_path / "dataset"
    write_videos(data, [("videos/a_b.mp4", 17), ("videos/a/b.mp4", 18), ("videos/a.b.mp4", 19)])
    rows = [{"file": "videos/a_b.mp4", "captions": "one"}, {"file": "videos/a/b.mp4", "captions": "two"},
            {"file": "videos/a.b.mp4", "captions": "three"}, {"file": "./videos/a_b.mp4", "captions": "again"}]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run(feature_argv(paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 rows in" in proc.stdout and "3 extracted" in proc.stdout
    assert "rows left out: 1 duplicate video (line 4)" in proc.stdout
    out = [json.loads(line) for line in (paths["save"] / "data.jsonl").read_text().splitlines()]
    assert len({r["file"] for r in out}) == 3  # one file per video; the old names were all videos_a_b_mp4.pt
    for row, source in zip(out, rows):
        record = torch.load(paths["save"] / row["file"], weights_only=True)["extracted_from"]
        assert (record["file"], record["caption"], record["num_frames"]) == (source["file"], source["captions"], 17)

    rows[1]["captions"] = "two, re-captioned"
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run(feature_argv(paths))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 kept from an earlier run" in proc.stdout and "1 re-extracted over a stale file" in proc.stdout
    record = torch.load(paths["save"] / out[1]["file"], weights_only=True)["extracted_from"]
    assert record["caption"] == "two, re-captioned"
