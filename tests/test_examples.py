"""What the examples ship works out of the box: script paths of both eras, default paths that agree, the i2v sample."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "stepvideo"


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.mark.parametrize("script", ["posttrain_dpo.py", "posttrain_sora_dpo.py", "posttrain_stepvideo_dpo.py",
                                    "examples/stepvideo/feature_extract/get_sora_feature.py",
                                    "mindspeed_mm/tools/feature_extraction/get_sora_feature.py"])
def test_every_entry_point_name_reaches_the_real_parser(script):
    """Each era's launchers call their own script path; all reach the same code (an unknown flag proves it: the
    project's parser answers, in one line)."""
    proc = subprocess.run([sys.executable, script, "--no-such-flag"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown flag --no-such-flag" in proc.stderr and "Traceback" not in proc.stderr


def test_default_paths_agree_between_feature_extraction_and_training():
    """tools.json writes the features where the training data configs read them."""
    save = json.loads((EXAMPLES / "feature_extract/tools.json").read_text())["sorafeature"]["save_path"]
    for task in ("t2v", "i2v"):
        basic = json.loads((EXAMPLES / task / "data_static_resolution.json").read_text())["dataset_param"][
            "basic_parameters"]
        assert os.path.normpath(basic["data_folder"]) == os.path.normpath(save), task
        assert os.path.normpath(basic["data_path"]) == os.path.normpath(os.path.join(save, "data.jsonl")), task


def test_outputs_of_the_examples_and_the_demo_are_ignored_by_git():
    paths = ["outputs/tiny_run/logs/x.log", "sora_features/data.jsonl", "examples/stepvideo/t2v/t2v_result/v.mp4",
             "examples/stepvideo/i2v/i2v_result/v.mp4"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.split() == paths


def test_the_shipped_i2v_example_runs(tmp_path):
    """inference_i2v.sh with the shipped prompt and image lists (the image used to be missing), on tiny weights:
    only the weight paths, sizes and step count of the model JSON are edited, as a user would."""
    from mindspeed_mm.checkpoint.convert import split
    from mindspeed_mm.tiny.dit import write_tiny_dit
    from mindspeed_mm.tiny.download import TINY_WIDTHS, write_tiny_download

    images = (EXAMPLES / "i2v/samples_i2v_images.txt").read_text().split()
    assert images and all((REPO / image).is_file() for image in images)
    sections = write_tiny_download(tmp_path / "weights", task="t2v")
    w = TINY_WIDTHS
    i2v_dit = write_tiny_dit(tmp_path / "weights" / "transformer_i2v", num_shards=1, seed=1,
                             num_layers=w["dit_layers"], num_heads=w["dit_heads"], head_dim=w["dit_head_dim"],
                             in_channels=sections["ae"]["z_channels"],
                             caption_channels=(w["llm_hidden"], w["clip_hidden"]), use_additional_conditions=True)
    model = json.loads((EXAMPLES / "i2v/inference_i2v_model.json").read_text())
    model.update(ae=sections["ae"], text_encoder=sections["text_encoder"], tokenizer=sections["tokenizer"],
                 predictor=dict(sections["predictor"], use_additional_conditions=True, from_pretrained=str(i2v_dit)),
                 save_path=str(tmp_path / "result"))
    model["pipeline_config"]["input_size"] = [17, 32, 32]
    model["diffusion"]["num_inference_timesteps"] = 2
    model["dtype"] = "fp32"
    (tmp_path / "model.json").write_text(json.dumps(model, ensure_ascii=False))
    split(i2v_dit, tmp_path / "converted", 1, [w["dit_layers"]], w["dit_layers"], log=lambda m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(MM_MODEL=str(tmp_path / "model.json"), NPUS_PER_NODE="1", TP="1", CP="1",
               LOAD_PATH=str(tmp_path / "converted"),
               MASTER_PORT=str(port), LOG_DIR=str(tmp_path / "logs"),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "examples/stepvideo/i2v/inference_i2v.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == ["video_0.mp4", "video_grid.mp4"]


def test_turbo_recipe_is_the_official_one_and_loads():
    """Step-Video-T2V-Turbo: the official recommendation is 10 to 15 steps, time shift 17, guidance 5; the config
    differs from the 50-step one in exactly those settings (and where it writes)."""
    from mindspeed_mm.config import load_config
    from mindspeed_mm.config.model import MMModelConfig

    turbo = json.loads((EXAMPLES / "t2v/inference_t2v_turbo_model.json").read_text())
    base = json.loads((EXAMPLES / "t2v/inference_t2v_model.json").read_text())
    assert 10 <= turbo["diffusion"]["num_inference_timesteps"] <= 15
    assert turbo["diffusion"]["shift"] == 17.0 and turbo["pipeline_config"]["guidance_scale"] == 5.0
    changed = {k for k in base if base[k] != turbo[k]}
    assert changed == {"diffusion", "pipeline_config", "save_path"}, changed
    for section in ("diffusion", "pipeline_config"):
        assert {k for k in base[section] if base[section][k] != turbo[section][k]} <= {
            "num_inference_timesteps", "shift", "guidance_scale"}
    cfg = load_config(MMModelConfig, str(EXAMPLES / "t2v/inference_t2v_turbo_model.json"), "--mm-model")
    assert cfg.diffusion.num_inference_timesteps == 15 and cfg.pipeline_config.guidance_scale == 5.0
