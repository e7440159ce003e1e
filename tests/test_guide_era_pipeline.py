"""Every stage of the user guide, run with launchers and JSON files of the guide's own era, on tiny weights.

The files are the project's own copies (tests/helpers/guide_era.py), with what the guide's era had: Megatron GPT
flags, `num_attention_heads`, `fps`, `data_process_type`, `data.txt` with `sorafeatured` features, the DPO file's DDPM
section and `histgram_path`, `pipeline_config.seed` without `--seed`, and the era's script paths
(`examples/stepvideo/feature_extract/get_sora_feature.py`, `posttrain_stepvideo_dpo.py`). They are edited only where
the guide says to edit (paths, node sizes, TP/CP) and where tiny weights need it (model sizes, in the JSON files and in
the GPT flags alike; clip sizes and step counts for a CPU).

One module fixture runs the stages in order, as a user would, each handing the next its files:
split -> feature extraction (t2v, i2v) -> pretraining (t2v, i2v) -> inference (t2v, i2v) -> preference pairs -> DPO.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import guide_era as era

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEADS, HEAD_DIM = 2, 4, 16  # the tiny download's DiT
FRAMES, SIZE = 17, 32


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(path: Path, script: str, flags, log: Path) -> Path:
    """A launcher shaped like the era's: the Ascend environment, the node variables, torchrun, tee to a log."""
    args = " ".join(shlex.quote(str(f)) for f in flags)
    path.write_text(f"""#!/bin/bash
source /usr/local/Ascend/ascend-toolkit/set_env.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export TASK_QUEUE_ENABLE=1
NPUS_PER_NODE=1
MASTER_ADDR=localhost
MASTER_PORT={_port()}
NNODES=1
NODE_RANK=0
DISTRIBUTED_ARGS="--nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR \
--master_port $MASTER_PORT"
set -o pipefail
torchrun $DISTRIBUTED_ARGS {script} {args} 2>&1 | tee {shlex.quote(str(log))}
""")
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(root: Path, stage: str, command) -> str:
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    (root / "logs" / f"{stage}.out").write_text(out)
    assert proc.returncode == 0, f"stage {stage} failed:\n{out[-4000:]}"
    return out


def _tiny(model: dict, sections: dict, i2v: bool = False) -> dict:
    """The model sizes of tiny weights, under the era's key names."""
    tiny = sections["predictor"]
    if "predictor" in model:
        model["predictor"].update(num_layers=LAYERS, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  channel_split=tiny["channel_split"], in_channels=tiny["in_channels"],
                                  out_channels=tiny["out_channels"], caption_channels=tiny["caption_channels"],
                                  use_additional_conditions=i2v)
    if "ae" in model:
        ae = dict(sections["ae"], dtype="bf16")
        if i2v and "i2v_processor" in model["ae"]:
            ae["i2v_processor"] = model["ae"]["i2v_processor"]
        model["ae"] = ae
    return model


def _clips(data: dict, frames: int = FRAMES) -> dict:
    data["dataset_param"]["preprocess_parameters"].update(num_frames=frames, max_height=SIZE, max_width=SIZE,
                                                          skip_frame_num=0, video_reader_type="PyAVVideo")
    return data


def _gpt(flags: list) -> list:
    """The GPT block's model sizes edited to the tiny weights (they are checked against the model JSON)."""
    sizes = {"--num-layers": LAYERS, "--hidden-size": HEADS * HEAD_DIM, "--num-attention-heads": HEADS,
             "--recompute-num-layers": LAYERS}
    return [str(sizes[flags[i - 1]]) if i and flags[i - 1] in sizes else f for i, f in enumerate(flags)]


def _flag(flags: list, name: str, value) -> list:
    flags = list(flags)
    flags[flags.index(name) + 1] = str(value)
    return flags


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    from mindspeed_mm.tiny.dit import write_tiny_dit
    from mindspeed_mm.tiny.download import TINY_WIDTHS, write_tiny_download
    from tests.helpers.pipeline_fixtures import write_videos

    root = tmp_path_factory.mktemp("guide_era")
    (root / "logs").mkdir()
    weights = root / "weights"
    sections = write_tiny_download(weights, task="t2v")
    w = TINY_WIDTHS
    write_tiny_dit(weights / "transformer_i2v", num_shards=1, seed=1, num_layers=LAYERS, num_heads=HEADS,
                   head_dim=HEAD_DIM, in_channels=sections["ae"]["z_channels"],
                   caption_channels=(w["llm_hidden"], w["clip_hidden"]), use_additional_conditions=True)
    dataset = root / "dataset"
    write_videos(dataset, [(f"videos/{i}.mp4", 20 + 2 * i) for i in range(4)])
    rows = [{"file": f"videos/{i}.mp4", "captions": ["a cat on a windowsill", "一只猫"][i % 2]} for i in range(4)]
    (dataset / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = root / "configs"
    cfg.mkdir()
    out = {}

    # 权重转换: the era's converter flag --pp_sizes
    converter = [sys.executable, "examples/stepvideo/convert_ckpt_to_mm.py", "--tp_size", "1", "--pp_sizes",
                 str(LAYERS), "--num_layers", str(LAYERS), "--mode", "split"]
    for task, source in (("t2v", weights / "transformer"), ("i2v", weights / "transformer_i2v")):
        _run(root, f"split_{task}", converter + ["--source_path", str(source), "--target_path",
                                                 str(root / f"converted_{task}")])

    # 特征提取, t2v and i2v: the era's script path, data.json with dataset_type t2v for both
    for task in ("t2v", "i2v"):
        features = root / f"features_{task}"
        data = era.write_json(cfg / f"feature_data_{task}.json",
                              _clips(era.feature_data(weights, dataset / "data.jsonl", dataset)))
        model = era.write_json(cfg / f"feature_model_{task}.json",
                               _tiny(era.feature_model(weights, i2v=task == "i2v"), sections, i2v=task == "i2v"))
        tools = era.write_json(cfg / f"tools_{task}.json", era.tools(features))
        flags = era.feature_flags(data, model, tools)
        launcher = _launcher(cfg / f"feature_extraction_{task}.sh", "./examples/stepvideo/feature_extract/"
                             "get_sora_feature.py", _flag(flags, "--num-workers", 0), root / "logs" / f"fe_{task}.log")
        out[f"features_{task}"] = _run(root, f"features_{task}", ["bash", str(launcher)])

    # 预训练, t2v and i2v: data.txt names the features, sorafeatured; GPT flags edited to the tiny sizes
    for task in ("t2v", "i2v"):
        i2v = task == "i2v"
        data_txt = cfg / f"data_{task}.txt"
        data_txt.write_text(era.data_txt_line(root / f"features_{task}"))
        data = era.write_json(cfg / f"data_static_resolution_{task}.json", _clips(era.pretrain_data(weights, data_txt)))
        model = era.write_json(cfg / f"pretrain_{task}_model.json",
                               _tiny(era.pretrain_model(weights, i2v=i2v), sections, i2v=i2v))
        flags = _gpt(era.pretrain_flags(data, model, "./mindspeed_mm/tools/tools.json", root / f"converted_{task}",
                                        root / f"trained_{task}", tp=1, gbs=2))
        flags = _flag(_flag(_flag(flags, "--train-iters", 2), "--num-workers", 0), "--save-interval", 2)
        launcher = _launcher(cfg / f"pretrain_{task}.sh", "pretrain_sora.py", flags, root / "logs" / f"pt_{task}.log")
        out[f"pretrain_{task}"] = _run(root, f"pretrain_{task}", ["bash", str(launcher)])

    # 推理, t2v (2 videos per prompt, for DPO) and i2v: pipeline_config.seed, no --seed; the trained checkpoints
    prompts = cfg / "samples_prompts.txt"
    prompts.write_text("a cat on a windowsill\n一只猫\n", encoding="utf-8")
    i2v_prompts, images = cfg / "samples_i2v_prompts.txt", cfg / "samples_i2v_images.txt"
    i2v_prompts.write_text("waves reach the rock\n", encoding="utf-8")
    images.write_text("examples/stepvideo/i2v/first_frame.png\n")
    for task in ("t2v", "i2v"):
        i2v = task == "i2v"
        model = era.inference_model(weights, i2v_prompts if i2v else prompts, root / f"{task}_result", seed=7,
                                    i2v=i2v, image=images if i2v else None)
        model = _tiny(model, sections, i2v=i2v)
        model["ae"].pop("i2v_processor", None)
        model.update(tokenizer=sections["tokenizer"], num_inference_videos_per_sample=1 if i2v else 2)
        model["pipeline_config"]["input_size"] = [FRAMES, SIZE, SIZE]
        model["diffusion"]["num_inference_timesteps"] = 2
        model_path = era.write_json(cfg / f"inference_{task}_model.json", model)
        flags = era.inference_flags(model_path, root / f"trained_{task}", tp=1, layers=LAYERS,
                                    hidden=HEADS * HEAD_DIM, heads=HEADS)
        log = root / "logs" / f"inf_{task}.log"
        launcher = _launcher(cfg / f"inference_{task}.sh", "inference_sora.py", flags, log)
        out[f"inference_{task}"] = _run(root, f"inference_{task}", ["bash", str(launcher)])

    # 生成偏好数据集: the guide's command line
    out["preference"] = _run(root, "preference", [
        sys.executable, "examples/stepvideo/histgram_generator.py", "--prompt_file", str(prompts), "--videos_path",
        str(root / "t2v_result"), "--num_inference_videos_per_sample", "2"])

    # DPO训练: data_dpo.json (raw videos), posttrain_t2v_model.json (DDPM section, histgram_path), the era's script
    data = era.dpo_data(weights, root / "data.jsonl", root / "t2v_result")
    data = era.write_json(cfg / "data_dpo.json", _clips(data))
    model = era.dpo_model(weights, root / "video_score_histogram.json", num_layers=LAYERS, num_heads=HEADS)
    model = era.write_json(cfg / "posttrain_t2v_model.json", _tiny(model, sections))
    flags = era.dpo_flags(data, model, "./mindspeed_mm/tools/tools.json", root / "trained_t2v", root / "dpo",
                          layers=LAYERS, hidden=HEADS * HEAD_DIM, heads=HEADS)
    flags = _gpt(_flag(_flag(flags, "--train-iters", 1), "--save-interval", 1)) + ["--finetune"]
    launcher = _launcher(cfg / "posttrain_t2v_dpo.sh", "posttrain_stepvideo_dpo.py", flags, root / "logs" / "dpo.log")
    out["dpo"] = _run(root, "dpo", ["bash", str(launcher)])
    return root, out


def test_conversion_and_feature_extraction(guide):
    root, out = guide
    for task in ("t2v", "i2v"):
        assert (root / f"converted_{task}" / "latest_checkpointed_iteration.txt").read_text() == "release"
        rows = [json.loads(line) for line in (root / f"features_{task}" / "data.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all((root / f"features_{task}" / r["file"]).is_file() for r in rows)
    import torch

    first = json.loads((root / "features_i2v" / "data.jsonl").read_text().splitlines()[0])["file"]
    assert "image_latents" in torch.load(root / "features_i2v" / first, weights_only=True)  # the era's i2v_processor


def test_pretraining_reads_data_txt_and_accepts_the_gpt_flags(guide):
    root, out = guide
    for task in ("t2v", "i2v"):
        assert (root / f"trained_{task}" / "latest_checkpointed_iteration.txt").read_text() == "2"
        text = out[f"pretrain_{task}"]
        assert "iteration        2/       2" in text
        notices = [line for line in text.splitlines() if line.startswith("notice:") and "--seq-length" in line]
        assert len(notices) == 1, text[-3000:]  # the flags without effect, named once


def test_inference_t2v_and_i2v_with_the_shipped_image(guide):
    root, out = guide
    assert sorted(p.name for p in (root / "t2v_result").iterdir()) == [
        "video_0.mp4", "video_1.mp4", "video_2.mp4", "video_3.mp4", "video_grid.mp4"]
    assert sorted(p.name for p in (root / "i2v_result").iterdir()) == ["video_0.mp4", "video_grid.mp4"]


def test_preference_pairs_and_dpo_with_the_ddpm_section(guide):
    root, out = guide
    pairs = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and all(p["score"] >= p["score_rejected"] for p in pairs)
    assert (root / "dpo" / "latest_checkpointed_iteration.txt").read_text() == "1"
    text = out["dpo"]
    assert "DDPM" in text and "flow" in text  # the notice: the section runs as flow matching, and why
    assert "loss: 6.93" in text  # log 2 at the first step: the actor equals its reference
