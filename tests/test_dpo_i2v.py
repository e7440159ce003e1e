"""i2v DPO: each member of a pair is conditioned on its own first frame, on extracted features and on raw videos.

(a) data level: the feature dataset's `image_latents_rejected`, the extraction plan and output rows of DPO manifests;
(b) end to end on a tiny i2v download: feature extraction of an i2v DPO manifest (two ranks), the feature batch and
    the condition the DiT receives, `posttrain_sora_dpo.py` on the features and on the raw videos.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.config import load_config
from mindspeed_mm.config.data import MMDataConfig
from mindspeed_mm.data import ManifestRow, build_dataset, collate, write_video
from mindspeed_mm.tools.feature_extraction.get_sora_feature import feature_name, plan_extraction, write_rows
from tests.helpers.training_fixtures import train_argv

REPO = Path(__file__).resolve().parents[1]
EXTRACT = REPO / "mindspeed_mm" / "tools" / "feature_extraction" / "get_sora_feature.py"


# ------------------------------------------------------------------------------------------------ (a) data level

def _feature(seed: int, i2v: bool = True, frames: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {"video": torch.randn(frames, 4, 2, 2, generator=g),
            "prompt_ids": [torch.randn(1, 5, 6, generator=g), torch.randn(1, 4, 3, generator=g)],
            "prompt_mask": [torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)],
            "extracted_from": {"file": f"v{seed}.mp4", "caption": "c"}}
    if i2v:
        cond = torch.zeros(frames, 4, 2, 2)
        cond[0] = torch.randn(4, 2, 2, generator=g)
        data["image_latents"] = cond
    return data


def _pair(file, rejected, caption="p"):
    return {"file": file, "file_rejected": rejected, "captions": caption, "score": 0.8, "score_rejected": 0.2}


def _feature_config(root: Path, rows) -> MMDataConfig:
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"dataset_param": {"dataset_type": "feature", "basic_parameters": {
        "data_path": str(root / "data.jsonl"), "data_folder": str(root)}}}
    (root / "data.json").write_text(json.dumps(cfg))
    return load_config(MMDataConfig, str(root / "data.json"), "--mm-data")


def test_feature_dataset_gives_the_loser_its_own_image_condition(tmp_path):
    for name, data in (("w", _feature(1)), ("l", _feature(2)), ("t2v", _feature(3, i2v=False)),
                       ("short", _feature(4, frames=2))):
        torch.save(data, tmp_path / f"{name}.pt")
    ds = build_dataset(_feature_config(tmp_path, [_pair("w.pt", "l.pt"), _pair("w.pt", "t2v.pt"),
                                                  _pair("l.pt", "w.pt")]))
    s = ds[0]
    winner, loser = torch.load(tmp_path / "w.pt"), torch.load(tmp_path / "l.pt")
    assert torch.equal(s["image_latents"], winner["image_latents"])
    assert torch.equal(s["image_latents_rejected"], loser["image_latents"])
    assert not torch.equal(s["image_latents"], s["image_latents_rejected"])
    assert "extracted_from" not in s and s["skipped_rows"] == []
    # A loser without image_latents cannot be trained i2v: the row is skipped, counted, and replaced by the next.
    replaced = ds[1]
    assert replaced["file"] == "l.pt" and replaced["skipped_rows"] == [[2, "bad DPO pair"]]
    assert torch.equal(replaced["image_latents_rejected"], winner["image_latents"])
    batch = collate([s, replaced])
    assert batch["image_latents_rejected"].shape == (2, 3, 4, 2, 2)
    assert torch.equal(batch["image_latents_rejected"][0], loser["image_latents"])
    assert batch["skipped_rows"] == [[], [[2, "bad DPO pair"]]]
    # Loser conditions of another shape are refused the same way.
    ds = build_dataset(_feature_config(tmp_path, [_pair("w.pt", "short.pt"), _pair("w.pt", "l.pt")]))
    assert ds[0]["skipped_rows"] == [[1, "bad DPO pair"]] and ds.read_failures == {"bad DPO pair": 1}


def _rows(specs):
    rows = []
    for line, (file, rejected, caption) in enumerate(specs, start=1):
        rows.append(ManifestRow(line=line, file=file, path=os.path.join("/d", file), captions=[caption],
                                file_rejected=rejected, path_rejected=os.path.join("/d", rejected), score=0.5 + line,
                                score_rejected=0.1, extra={"prompt_id": line}))
    return rows


def test_plan_extracts_both_videos_of_each_pair_once():
    plan = plan_extraction(_rows([("./video_1.mp4", "./video_0.mp4", "a"),   # 1 ok
                                  ("video_2.mp4", "video_0.mp4", "a"),       # 2 ok, shares its loser with line 1
                                  ("video_1.mp4", "./video_0.mp4", "a"),     # 3 the pair of line 1
                                  ("video_3.mp4", "video_3.mp4", "b"),       # 4 one video
                                  ("video_1.mp4", "video_4.mp4", "b"),       # 5 the winner of line 1, other prompt
                                  ("video_0.mp4", "video_5.mp4", "a")]),     # 6 line 1's loser wins here, same prompt
                           "/d", seed=0)
    assert [v.key for v in plan.videos] == ["video_1.mp4", "video_0.mp4", "video_2.mp4", "video_5.mp4"]
    assert [(p.row.line, p.video, p.rejected) for p in plan.rows] == [(1, 0, 1), (2, 2, 1), (6, 1, 3)]
    assert dict(plan.skipped) == {"duplicate pair": [3], "winner and loser are one video": [4],
                                  "video extracted with another caption": [5]}
    assert all(v.caption == "a" for v in plan.videos)


def test_output_rows_keep_file_rejected_and_scores(tmp_path):
    plan = plan_extraction(_rows([("video_1.mp4", "video_0.mp4", "a"), ("video_2.mp4", "video_3.mp4", "b"),
                                  ("video_4.mp4", "video_0.mp4", "c")]), "/d", seed=0)
    written, dropped = write_rows(tmp_path, plan, failures={3: "unreadable video"})  # video_3, line 2's loser
    assert (written, dropped) == (2, [2])
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt_id": 1, "file": f"features/{feature_name('video_1.mp4')}", "captions": "a",
                       "file_rejected": f"features/{feature_name('video_0.mp4')}", "score": 1.5,
                       "score_rejected": 0.1}
    assert rows[1]["file_rejected"] == rows[0]["file_rejected"] and rows[1]["score"] == 3.5


# ------------------------------------------------------------------------------------------------ (b) end to end

def _write_clip(path: Path, phase: int, frames: int = 17) -> None:
    """A moving pattern whose first frame depends on `phase`, so each video has its own image condition."""
    y, x = np.mgrid[0:32, 0:32]
    video = np.stack([np.stack([(x * 6 + 7 * t + 40 * phase) % 256, (y * 6 + 90 * phase) % 256,
                                ((x + y) * 3 + 5 * t + 60 * phase) % 256], -1) for t in range(frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(path), video.astype(np.uint8), fps=8)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    return path


def _losses(stdout: str):
    return [float(line.split("| loss: ")[1].split(" ")[0]) for line in stdout.splitlines() if "| loss: " in line]


@pytest.fixture(scope="module")
def i2v_setup(tmp_path_factory):
    """A tiny i2v download, four generated-looking videos and the pairs histgram_generator.py would write."""
    from mindspeed_mm.tiny.download import write_tiny_download

    root = tmp_path_factory.mktemp("i2v_dpo")
    sections = write_tiny_download(root / "weights", task="i2v")
    videos = root / "dpo_samples" / "videos"
    for i in range(4):
        _write_clip(videos / f"video_{i}.mp4", phase=i)
    _write_clip(root / "dpo_samples" / "outside.mp4", phase=9)
    pairs = [_pair("./video_1.mp4", "./video_0.mp4", "a cat turns its head"),
             _pair("./video_2.mp4", "./video_3.mp4", "一只猫"),
             _pair("./video_1.mp4", "../outside.mp4", "a cat turns its head")]  # refused: outside data_folder
    (root / "dpo_samples" / "data.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    _json(root / "video_score_histogram.json", {"0.2-0.30000000000000004": 1, "0.30000000000000004-0.4": 1,
                                                "total_num": 2, "max_num": 1, "min_bin": 2, "max_bin": 4,
                                                "bin_width": 0.1, "bin_size": 2})
    raw = {"dataset_param": {
        "dataset_type": "i2v",
        "basic_parameters": {"data_path": str(root / "dpo_samples" / "data.jsonl"), "data_folder": str(videos)},
        "preprocess_parameters": {"video_reader_type": "PyAVVideo", "train_fps": 8, "skip_frame_num": 0,
                                  "num_frames": 17, "max_height": 32, "max_width": 32},
        "tokenizer_config": sections["tokenizer"]},
        "dataloader_param": {"shuffle": False, "drop_last": True, "pin_memory": False}}
    ae = dict(sections["ae"], i2v_processor={"processor_id": "stepvideo_i2v_processor"})
    return {"root": root, "sections": sections, "videos": videos, "raw_data": _json(root / "data_i2v.json", raw),
            "ae": ae, "histogram": root / "video_score_histogram.json"}


@pytest.fixture(scope="module")
def extracted(i2v_setup):
    """Feature extraction of the i2v DPO manifest on two ranks (torchrun), as feature_extraction_i2v.sh runs it."""
    s = i2v_setup
    save = s["root"] / "features"
    model = _json(s["root"] / "model_i2v.json", {"text_encoder": s["sections"]["text_encoder"], "ae": s["ae"]})
    tools = _json(s["root"] / "tools.json", {"sorafeature": {"save_path": str(save)}})
    argv = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--context-parallel-size",
            "1", "--micro-batch-size", "1", "--global-batch-size", "2", "--num-workers", "1", "--mm-data",
            str(s["raw_data"]), "--mm-model", str(model), "--mm-tool", str(tools), "--distributed-backend", "nccl"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           _port(), str(EXTRACT), *argv], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"save": save, "out": proc.stdout + proc.stderr}


def test_extraction_writes_both_videos_of_each_pair(i2v_setup, extracted):
    save, out = extracted["save"], extracted["out"]
    # The manifest summary is logged once (rank 0), not once per rank.
    assert out.count("kept 2 of 3 rows in data.jsonl: 1 outside data_folder (line 3)") == 1, out[-3000:]
    assert "feature extraction: 2 rows in" in out and "4 extracted" in out
    rows = [json.loads(line) for line in (save / "data.jsonl").read_text().splitlines()]
    assert [(r["file"], r["file_rejected"], r["score"], r["score_rejected"]) for r in rows] == [
        (f"features/{feature_name(f'video_{w}.mp4')}", f"features/{feature_name(f'video_{lo}.mp4')}", 0.8, 0.2)
        for w, lo in ((1, 0), (2, 3))]
    for row in rows:
        winner = torch.load(save / row["file"], weights_only=True)
        loser = torch.load(save / row["file_rejected"], weights_only=True)
        for data, file in ((winner, row["file"]), (loser, row["file_rejected"])):
            assert data["image_latents"].shape == data["video"].shape
            assert torch.all(data["image_latents"][1:] == 0)
            assert data["extracted_from"]["caption"] == row["captions"]
        assert not torch.allclose(winner["image_latents"][0], loser["image_latents"][0], atol=1e-2)


def _feature_data(i2v_setup, extracted) -> Path:
    save = extracted["save"]
    return _json(i2v_setup["root"] / "feature_data.json", {
        "dataset_param": {"dataset_type": "feature", "basic_parameters": {
            "data_path": str(save / "data.jsonl"), "data_folder": str(save)}},
        "dataloader_param": {"shuffle": False, "drop_last": True, "pin_memory": False}})


def _dpo_model(i2v_setup, features: bool) -> dict:
    s = i2v_setup
    model = {"load_video_features": features, "load_text_features": features, "predictor": s["sections"]["predictor"],
             "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0},
             "dpo": {"histogram_path": str(s["histogram"]), "weight_alpha": 0, "weight_beta": None,
                     "loss_beta": 2000}}
    if not features:
        model.update(text_encoder=s["sections"]["text_encoder"], ae=s["ae"])
    return model


def _dpo_in_process(i2v_setup, vae=None):
    """The real DPOLossModel on the tiny i2v DiT, with a hook that records the image condition the actor receives."""
    from mindspeed_mm.models.diffusion import FlowMatchScheduler
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.models.dpo_loss import DPOLossModel

    folder = i2v_setup["sections"]["predictor"]["from_pretrained"]
    model = DPOLossModel(StepVideoDiT.from_pretrained(folder, dtype="fp32"), FlowMatchScheduler(),
                         StepVideoDiT.from_pretrained(folder, dtype="fp32"), vae=vae, i2v=True)
    seen = []
    model.predictor.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["image_latents"]),
                                              with_kwargs=True)
    return model, seen


def test_the_loser_condition_reaches_the_model_from_features(i2v_setup, extracted):
    ds = build_dataset(load_config(MMDataConfig, str(_feature_data(i2v_setup, extracted)), "--mm-data"))
    batch = collate([ds[0], ds[1]])
    save = extracted["save"]
    for k in range(2):
        row = ds.rows[k]
        assert torch.equal(batch["image_latents"][k], torch.load(row.path, weights_only=True)["image_latents"])
        assert torch.equal(batch["image_latents_rejected"][k],
                           torch.load(row.path_rejected, weights_only=True)["image_latents"])
        assert str(save) in row.path_rejected
    model, seen = _dpo_in_process(i2v_setup)
    with torch.no_grad():
        loss, _ = model(batch, torch.Generator().manual_seed(0))
    (cond,) = seen
    assert torch.equal(cond[:2], batch["image_latents"]) and torch.equal(cond[2:], batch["image_latents_rejected"])
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))  # actor == reference at the start


def test_the_loser_condition_is_its_own_first_frame_on_raw_videos(i2v_setup):
    from mindspeed_mm.config.base import from_dict
    from mindspeed_mm.config.model import AEConfig
    from mindspeed_mm.models.ae import StepVideoVAE

    ds = build_dataset(load_config(MMDataConfig, str(i2v_setup["raw_data"]), "--mm-data"))
    sample = ds[0]
    vae = StepVideoVAE.from_config(from_dict(AEConfig, i2v_setup["ae"]), device="cpu")
    model, seen = _dpo_in_process(i2v_setup, vae=vae)
    g = torch.Generator().manual_seed(0)
    text = {"prompt": [torch.randn(1, 320, 64, generator=g), torch.randn(1, 77, 32, generator=g)],
            "prompt_mask": [torch.ones(1, 320, dtype=torch.long), torch.ones(1, 77, dtype=torch.long)]}
    winner, loser = sample["video"][None], sample["video_rejected"][None]
    other_first = loser.clone()
    other_first[:, 0] = winner[:, 0]  # the loser with the winner's first frame, nothing else changed
    with torch.no_grad():
        for rejected in (loser, other_first):  # same seed: the VAE and pixel noise draws are the same in both runs
            model({"video": winner, "video_rejected": rejected, **text}, torch.Generator().manual_seed(1))
    own, swapped = seen
    assert torch.equal(own[0], swapped[0])  # the winner's condition does not depend on the loser
    assert not torch.allclose(own[1], swapped[1])  # the loser's condition comes from the loser's first frame
    assert torch.all(own[:, 1:] == 0) and not torch.allclose(own[0], own[1])


def test_posttrain_i2v_dpo_on_features(i2v_setup, extracted, tmp_path):
    model = _json(tmp_path / "posttrain_i2v.json", _dpo_model(i2v_setup, features=True))
    paths = {"data": _feature_data(i2v_setup, extracted), "model": model}
    proc = subprocess.run([sys.executable, str(REPO / "posttrain_sora_dpo.py"),
                           *train_argv(paths, tmp_path / "save", iters=2)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = _losses(proc.stdout)
    assert len(losses) == 2 and abs(losses[0] - math.log(2)) < 1e-4
    assert (tmp_path / "save" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def test_posttrain_i2v_dpo_on_raw_videos(i2v_setup, tmp_path):
    model = _json(tmp_path / "posttrain_i2v.json", _dpo_model(i2v_setup, features=False))
    paths = {"data": i2v_setup["raw_data"], "model": model}
    proc = subprocess.run([sys.executable, str(REPO / "posttrain_sora_dpo.py"),
                           *train_argv(paths, tmp_path / "save", iters=1)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = _losses(proc.stdout)
    assert len(losses) == 1 and abs(losses[0] - math.log(2)) < 1e-4
    assert proc.stdout.count("kept 2 of 3 rows in data.jsonl") == 1
