"""Tiny inference set-ups: a tiny download, an inference model JSON, prompt/image lists and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

# 17 frames at 32 x 32 -> 3 latent frames of 2 x 2 with the tiny VAE.
TINY_INPUT_SIZE = [17, 32, 32]


def write_png(path: Path, image: np.ndarray) -> Path:
    """A uint8 RGB (H, W, 3) image as a PNG file, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = image.shape
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = w, h, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pattern_image(height: int, width: int, phase: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + phase) % 256, (y * 5 + 3 * phase) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)


def model_json(sections: dict, task: str, root: Path, *, prompt: Path, image: Optional[Path] = None,
               save_path: Optional[Path] = None, steps: int = 2, videos_per_prompt: int = 1, fps: int = 16,
               frame_interval: int = 2, use_from_pretrained: bool = True, input_size: Sequence[int] = TINY_INPUT_SIZE,
               guidance_scale: float = 9.0, name: str = "model.json") -> Path:
    predictor = dict(sections["predictor"])
    if not use_from_pretrained:
        predictor["from_pretrained"] = None
    cfg = {
        "predictor": predictor, "ae": sections["ae"], "tokenizer": sections["tokenizer"],
        "text_encoder": sections["text_encoder"],
        "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1,
                      "num_inference_timesteps": steps, "shift": 13.0, "reverse": False, "solver": "euler"},
        "pipeline_config": {"version": "stepvideo", "use_attention_mask": True, "input_size": list(input_size),
                            "guidance_scale": guidance_scale, "model_type": task},
        "unload_text_encoder": True, "frame_interval": frame_interval,
        "save_path": str(save_path or root / "out"), "fps": fps, "prompt": str(prompt),
        "num_inference_videos_per_sample": videos_per_prompt, "pipeline_class": "StepVideoPipeline",
        "device": "cpu", "dtype": "fp32",
    }
    if task == "i2v":
        cfg["pipeline_config"]["motion_score"] = 5.0
        if image is not None:
            cfg["image"] = str(image)
    path = root / name
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return path


def write_lines(path: Path, lines: List[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def inference_argv(model: Path, tp: int = 1, cp: int = 1, mbs: int = 1, seed: int = 1234,
                   load: Optional[Path] = None) -> List[str]:
    argv = ["--mm-model", str(model), "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp),
            "--micro-batch-size", str(mbs), "--seed", str(seed), "--distributed-backend", "gloo"]
    if load is not None:
        argv += ["--load", str(load)]
    return argv
