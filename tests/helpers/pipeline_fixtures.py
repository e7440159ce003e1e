"""Tiny end-to-end inputs shared by pipeline tests: a tiny download, small videos, and the three JSON configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mindspeed_mm.data import write_video
from mindspeed_mm.tiny.download import write_tiny_download


def write_videos(root: Path, specs) -> None:
    """specs: [(relative path, frames)] -> moving-gradient mp4 files (32 x 32, 8 fps)."""
    for rel, frames in specs:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:32, 0:32]
        video = np.stack([np.stack([(x * 6 + 7 * t) % 256, (y * 6) % 256, ((x + y) * 3 + 5 * t) % 256], -1)
                          for t in range(frames)]).astype(np.uint8)
        write_video(str(path), video, fps=8)


def write_configs(root: Path, task: str = "t2v", num_frames: int = 17) -> dict:
    """A tiny download, a dataset of three videos (two sharing a basename, one corrupt) and the JSON configs."""
    sections = write_tiny_download(root / "weights", task=task)
    data = root / "dataset"
    write_videos(data, [("videos/a/1.mp4", 20), ("videos/b/1.mp4", 24)])
    (data / "videos/broken.mp4").write_bytes(b"not a video")
    rows = [{"file": "videos/a/1.mp4", "captions": "a cat walks"},
            {"file": "videos/broken.mp4", "captions": "broken"},
            {"file": "videos/b/1.mp4", "captions": ["一只猫", "a cat"]}]
    (data / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    data_json = {
        "dataset_param": {
            "dataset_type": task,
            "basic_parameters": {"data_path": str(data / "data.jsonl"), "data_folder": str(data),
                                 "data_storage_mode": "standard"},
            "preprocess_parameters": {"video_reader_type": "PyAVVideo", "train_fps": 8, "skip_frame_num": 0,
                                      "num_frames": num_frames, "max_height": 32, "max_width": 32},
            "use_text_processer": True, "enable_text_preprocessing": False,
            "tokenizer_config": sections["tokenizer"],
        },
        "dataloader_param": {"dataloader_mode": "sampler", "shuffle": False, "drop_last": True},
    }
    model_json = {"text_encoder": sections["text_encoder"], "ae": dict(sections["ae"])}
    if task == "i2v":
        model_json["ae"]["i2v_processor"] = {"processor_id": "stepvideo_i2v_processor"}
    tools_json = {"sorafeature": {"save_path": str(root / "features_out")}}
    paths = {}
    for name, obj in (("data", data_json), ("model", model_json), ("tools", tools_json)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    paths["sections"] = sections
    paths["save"] = root / "features_out"
    return paths


def feature_argv(paths: dict) -> list:
    return ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--context-parallel-size",
            "1", "--micro-batch-size", "1", "--num-workers", "0", "--mm-data", str(paths["data"]),
            "--mm-model", str(paths["model"]), "--mm-tool", str(paths["tools"]), "--distributed-backend", "nccl"]
