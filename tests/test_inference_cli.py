"""inference_sora.py and the launchers on a tiny download: prompt/image lists, refusals, and a whole run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference_sora import main
from mindspeed_mm.arguments import parse_args
from mindspeed_mm.checkpoint.convert import split
from mindspeed_mm.config import from_dict
from mindspeed_mm.config.model import MMModelConfig
from mindspeed_mm.data import open_video
from mindspeed_mm.inference import (MAX_PROMPTS, InferenceInputError, StepVideoPipeline, build_plan,
                                    grid_frame_size, read_prompts, save_videos)
from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tiny.download import write_tiny_download
from tests.helpers.inference_fixtures import (inference_argv, model_json, pattern_image, write_lines,
                                              write_png)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_cli")
    sections = write_tiny_download(root / "weights", task="t2v")
    load = split(sections["predictor"]["from_pretrained"], root / "converted", tp_size=1, pp_layers=[2],
                 num_layers=2, log=lambda msg: None)
    return root, sections, Path(load)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompt_list_and_plan(tiny, tmp_path):
    root, sections, _ = tiny
    lines = [f"prompt {i}" if i % 10 else "   " for i in range(MAX_PROMPTS + 5)]
    prompts = read_prompts(write_lines(tmp_path / "many.txt", lines))
    assert prompts == [f"prompt {i}" for i in range(MAX_PROMPTS) if i % 10]  # first 100 lines, blanks dropped
    with pytest.raises(InferenceInputError, match="holds no prompt"):
        read_prompts(write_lines(tmp_path / "blank.txt", ["", "  "]))

    prompt = write_lines(tmp_path / "p.txt", ["a", "", "b", "c"])
    args = parse_args(inference_argv(model_json(sections, "t2v", tmp_path, prompt=prompt, videos_per_prompt=2,
                                                fps=25, frame_interval=2)), entry="inference")
    plan = build_plan(args)
    assert plan.prompts == ["a", "a", "b", "b", "c", "c"] and plan.fps == 12 and plan.images is None
    assert plan.share(0, 2) == [0, 2, 4] and plan.share(1, 2) == [1, 3, 5] and plan.share(0, 1) == list(range(6))
    assert plan.share(7, 8) == []


def test_i2v_image_list(tiny, tmp_path):
    root, sections, _ = tiny
    i2v_sections = dict(sections, predictor=dict(sections["predictor"], use_additional_conditions=True))
    prompt = write_lines(tmp_path / "prompts.txt", ["smile", "wave"])
    write_png(tmp_path / "imgs" / "a.png", pattern_image(32, 32))
    images = write_lines(tmp_path / "imgs" / "list.txt", ["a.png", str(tmp_path / "imgs" / "a.png")])
    args = parse_args(inference_argv(model_json(i2v_sections, "i2v", tmp_path, prompt=prompt, image=images,
                                                videos_per_prompt=2)), entry="inference")
    plan = build_plan(args)  # relative paths: from the working directory, else from the list file's folder
    assert plan.images == [str(tmp_path / "imgs" / "a.png")] * 4

    short = write_lines(tmp_path / "short.txt", ["a.png"])
    model = model_json(i2v_sections, "i2v", tmp_path, prompt=prompt, image=short, name="short.json")
    with pytest.raises(InferenceInputError, match=r"'.*short\.txt' has 1 image path\(s\) but the prompt file "
                                                  r"'.*prompts\.txt' has 2"):
        main(inference_argv(model))
    missing = write_lines(tmp_path / "imgs" / "missing.txt", ["a.png", "nowhere/b.png"])
    model = model_json(i2v_sections, "i2v", tmp_path, prompt=prompt, image=missing, name="missing.json")
    with pytest.raises(InferenceInputError, match=r"image 'nowhere/b.png' \(entry 2 of the image list '.*missing"):
        main(inference_argv(model))
    model = model_json(i2v_sections, "i2v", tmp_path, prompt=prompt, name="noimage.json")
    with pytest.raises(InferenceInputError, match="i2v needs 'image'"):
        main(inference_argv(model))
    model = model_json(sections, "i2v", tmp_path, prompt=prompt, image=images, name="t2vdit.json")
    with pytest.raises(InferenceInputError, match="use_additional_conditions is false"):
        main(inference_argv(model))


def test_refuses_to_run_without_dit_weights(tiny, tmp_path, monkeypatch):
    root, sections, _ = tiny
    prompt = write_lines(tmp_path / "p.txt", ["a cat"])
    model = model_json(sections, "t2v", tmp_path, prompt=prompt, use_from_pretrained=False)
    with pytest.raises(InferenceInputError, match="no DiT weights: pass --load LOAD_PATH .* predictor.from_pretrained"):
        main(inference_argv(model))
    # The command line prints it as one line and exits with status 2, before any process group or model.
    proc = subprocess.run([sys.executable, str(REPO / "inference_sora.py"), *inference_argv(model)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no DiT weights"), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    # dit_layerwise_offload with a setting it cannot run with: refused there too, before any model is loaded.
    offload = model_json(sections, "t2v", tmp_path, prompt=prompt, name="offload.json")
    offload.write_text(json.dumps(dict(json.loads(offload.read_text()), dit_layerwise_offload=True)))
    import mindspeed_mm.runtime

    def no_runtime(*a, **kw):
        raise AssertionError("the process group was started before the settings were checked")

    monkeypatch.setattr(mindspeed_mm.runtime, "initialize_runtime", no_runtime)
    with pytest.raises(InferenceInputError, match="dit_layerwise_offload cannot be combined with --use-torch-compile"):
        main(inference_argv(offload) + ["--use-torch-compile"])


def test_launcher_writes_videos_and_grid(tiny, tmp_path):
    """bash examples/stepvideo/t2v/inference_t2v.sh with --load: 2 prompts x 2 videos, micro-batch 2."""
    root, sections, load = tiny
    prompt = write_lines(tmp_path / "prompts.txt", ["a cat walks along a windowsill", "一只猫"])
    save = tmp_path / "result"
    model = model_json(sections, "t2v", tmp_path, prompt=prompt, save_path=save, videos_per_prompt=2, fps=16,
                       frame_interval=2, use_from_pretrained=False)
    proc = subprocess.run(
        ["bash", str(REPO / "examples/stepvideo/t2v/inference_t2v.sh")], cwd=REPO, capture_output=True, text=True,
        timeout=600, env=_env(NPUS_PER_NODE="1", TP="1", MBS="2", LOAD_PATH=str(load), MM_MODEL=str(model),
                              MASTER_PORT=str(_free_port()), LOG_DIR=str(tmp_path / "logs"), SEED="77"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert sorted(p.name for p in save.iterdir()) == ["video_0.mp4", "video_1.mp4", "video_2.mp4", "video_3.mp4",
                                                      "video_grid.mp4"]
    assert len(list((tmp_path / "logs").iterdir())) == 1
    written = []
    for i in range(4):
        with open_video(str(save / f"video_{i}.mp4"), "PyAVVideo") as video:
            assert (video.num_frames, video.fps) == (17, 8)  # fps // frame_interval
            written.append(video.get_frames(range(17)).float())
    assert written[0].shape == (17, 32, 32, 3)
    with open_video(str(save / "video_grid.mp4"), "PyAVVideo") as grid:
        assert (grid.num_frames, grid.fps) == (17, 8)
        assert tuple(grid.get_frames([0]).shape[1:3]) == grid_frame_size(4, 32, 32) == (68, 68)

    # The same videos in this process: video i is prompt i // 2 with seed --seed + i.
    cfg = from_dict(MMModelConfig, json.loads(model.read_text()), source=str(model))
    dit = StepVideoDiT.from_pretrained(sections["predictor"]["from_pretrained"], cfg.predictor).eval()
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    pipe = StepVideoPipeline.from_config(cfg, dit, StepVideoVAE.from_config(cfg.ae), encoder, None)
    reference = pipe(["a cat walks along a windowsill"] * 2 + ["一只猫"] * 2, seeds=[77, 78, 79, 80])
    # Through the same encoder: equal frames give equal files (x264 is deterministic), so compare decoded frames.
    again = save_videos(reference, range(4), tmp_path / "reference", fps=8)
    for i, path in enumerate(again):
        with open_video(path, "PyAVVideo") as video:
            expected = video.get_frames(range(17)).float()
        # Thread counts and batches differ (2 + 2 there, 4 here), so a few values may differ by one level, which
        # H.264 turns into small local differences (measured mean 0 to 2, against about 50 between two videos).
        error = (written[i] - expected).abs().mean()
        assert error < 0.1 * (written[i] - written[i ^ 1]).abs().mean(), i
    assert not torch.equal(written[0], written[1])  # two samples of one prompt differ (DPO needs that)
