"""The whole StepVideo workflow of the user guide, end to end, on tiny random weights (runs on a CPU in about a minute).

    python examples/stepvideo/tiny/run_pipeline.py --workdir outputs/tiny_run

Every stage runs the real command a user runs, in its own process, on files in the official layouts:

 1. weights      a tiny official download (transformer/, vae/, step_llm/, hunyuan_clip/) with random weights
 2. data         four short videos and data.jsonl (the guide's dataset format)
 3. convert      convert_ckpt_to_mm.py --mode split            (权重转换)
 4. features     get_sora_feature.py                           (特征提取)
 5. pretrain     pretrain_sora.py on the features, from the converted checkpoint   (预训练)
 6. inference    inference_sora.py with the trained checkpoint, 2 videos per prompt (推理, DPO sampling)
 7. preference   histgram_generator.py: scores, histogram and pairs               (生成偏好数据集)
 8. dpo          posttrain_dpo.py on the pairs                                     (DPO训练)
 9. export       convert_ckpt_to_mm.py --mode export: the DPO-trained DiT back in the official format
10. lora         pretrain_sora.py --lora-target-modules ...: a LoRA adapter on the pretrained DiT (LoRA微调)
11. lora-merge   convert_ckpt_to_mm.py --mode merge --lora-load: the adapter merged into its base
12. lora-peft    convert_ckpt_to_mm.py --mode export --lora-load --save-lora-to-hf: the adapter alone, peft-style
13. lora-infer   inference_sora.py --lora-load: the adapter applied unmerged
14. merged-infer inference_sora.py on the merged checkpoint: the same latents as 13 (checked here)

The random weights make the videos noise; the point is that every stage runs and hands the next one its files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

PROMPTS = ["A cat walks along a sunny windowsill.", "一只猫沿着阳光明媚的窗台走动。"]


def _run(stage: str, args, log_dir: Path, **env_extra) -> None:
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **env_extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True)
    (log_dir / f"{stage}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"stage '{stage}' failed (exit {proc.returncode}); log: {log_dir / (stage + '.log')}\n{tail}")
    print(f"  {stage:<12s} ok ({time.time() - start:4.1f} s)", flush=True)


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    return path


def _training_flags(iters: int) -> list:
    return ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--context-parallel-size",
            "1", "--context-parallel-algo", "ulysses_cp_algo", "--micro-batch-size", "1", "--global-batch-size",
            "2", "--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant", "--adam-beta1", "0.9",
            "--adam-beta2", "0.999", "--adam-eps", "1e-15", "--weight-decay", "1e-2", "--clip-grad", "1.0",
            "--train-iters", str(iters), "--no-gradient-accumulation-fusion", "--use-distributed-optimizer",
            "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "48",
            "--num-workers", "0", "--log-interval", "1", "--save-interval", "100", "--ckpt-format", "torch",
            "--seed", "1234", "--distributed-backend", "nccl"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="outputs/tiny_run",
                        help="where everything is written (default: outputs/tiny_run, which git ignores)")
    parser.add_argument("--keep", action="store_true", help="keep an existing workdir instead of starting fresh")
    args = parser.parse_args(argv)

    from mindspeed_mm.data import write_video
    from mindspeed_mm.tiny.download import write_tiny_download
    from mindspeed_mm.tiny.vae import smooth_video

    work = Path(args.workdir).resolve()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"tiny StepVideo pipeline in {work}")

    # 1-2. weights and data
    sections = write_tiny_download(work / "weights" / "stepvideo-t2v", task="t2v")
    data = work / "dataset"
    rows = []
    for i in range(4):
        clip = smooth_video(20 + 4 * i, 32, 32)[0]  # (T, 3, H, W) in [-0.8, 0.8]
        frames = ((clip.roll(i, dims=-1).permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte().numpy()
        write_video(str(data / "videos" / f"{i}.mp4"), frames, fps=8)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{i}.txt").write_text(PROMPTS[i % 2])
        rows.append({"file": f"videos/{i}.mp4", "captions": PROMPTS[i % 2]})
    (data / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print("  weights      ok\n  data         ok")

    configs = work / "configs"
    preprocess = {"video_processor_type": "CogVideoXProcessor", "video_reader_type": "DecordVideo", "train_fps": 8,
                  "skip_frame_num": 0, "num_frames": 17, "max_height": 32, "max_width": 32,
                  "train_pipeline": {"video": [], "image": []}}
    raw_data = {"dataset_param": {"dataset_type": "t2v",
                                  "basic_parameters": {"data_path": str(data / "data.jsonl"),
                                                       "data_folder": str(data), "data_storage_mode": "standard"},
                                  "preprocess_parameters": preprocess, "use_text_processer": True,
                                  "enable_text_preprocessing": False, "tokenizer_config": sections["tokenizer"]},
                "dataloader_param": {"dataloader_mode": "sampler", "sampler_type": "SequentialSampler",
                                     "shuffle": False, "drop_last": True, "pin_memory": False}}
    diffusion = {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0,
                 "reverse": False, "solver": "euler"}
    predictor = dict(sections["predictor"], from_pretrained=None)

    # 3. convert
    converted = work / "converted"
    _run("convert", ["examples/stepvideo/convert_ckpt_to_mm.py", "--source_path",
                     sections["predictor"]["from_pretrained"], "--target_path", converted, "--tp_size", 1,
                     "--pp_size", 2, "--num_layers", 2, "--mode", "split"], logs)

    # 4. features
    features = work / "features"
    _run("features", ["mindspeed_mm/tools/feature_extraction/get_sora_feature.py",
                      "--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1,
                      "--context-parallel-size", 1, "--micro-batch-size", 1, "--global-batch-size", 1,
                      "--num-workers", 0, "--distributed-backend", "nccl",
                      "--mm-data", _json(configs / "feature_data.json", raw_data),
                      "--mm-model", _json(configs / "feature_model.json",
                                          {"text_encoder": sections["text_encoder"], "ae": sections["ae"]}),
                      "--mm-tool", _json(configs / "tools.json", {"sorafeature": {"save_path": str(features)}})],
         logs)

    # 5. pretrain on the features
    feature_data = {"dataset_param": {"dataset_type": "feature", "basic_parameters": {
        "data_path": str(features / "data.jsonl"), "data_folder": str(features)}},
        "dataloader_param": raw_data["dataloader_param"]}
    train_model = {"load_video_features": True, "load_text_features": True, "predictor": predictor,
                   "diffusion": diffusion}
    trained = work / "train"
    _run("pretrain", ["pretrain_sora.py", *_training_flags(4), "--load", converted, "--save", trained,
                      "--mm-data", _json(configs / "data_static_resolution.json", feature_data),
                      "--mm-model", _json(configs / "pretrain_t2v_model.json", train_model)], logs)

    # 6. inference with the trained checkpoint, 2 videos per prompt (the DPO sampling step)
    samples = work / "samples"
    (configs / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    infer_model = {"predictor": predictor, "ae": sections["ae"], "tokenizer": sections["tokenizer"],
                   "text_encoder": sections["text_encoder"],
                   "diffusion": dict(diffusion, num_train_timesteps=1, num_inference_timesteps=4),
                   "pipeline_config": {"version": "stepvideo", "use_attention_mask": True, "input_size": [17, 32, 32],
                                       "guidance_scale": 9.0, "model_type": "t2v"},
                   "unload_text_encoder": True, "frame_interval": 1, "save_path": str(samples), "fps": 8,
                   "prompt": str(configs / "prompts.txt"), "num_inference_videos_per_sample": 2,
                   "pipeline_class": "StepVideoPipeline", "dtype": "fp32"}
    infer_flags = ["--tensor-model-parallel-size", 1, "--context-parallel-size", 1, "--micro-batch-size", 1,
                   "--no-load-optim", "--no-load-rng", "--seed", 1234, "--distributed-backend", "nccl"]
    latents = {"MINDSPEED_MM_SAVE_LATENTS": "1"}  # latents_{i}.pt beside the videos, for the LoRA check below
    _run("inference", ["inference_sora.py", "--mm-model", _json(configs / "inference_t2v_model.json", infer_model),
                       "--load", trained, *infer_flags], logs, **latents)

    # 7. preference data
    _run("preference", ["examples/stepvideo/histgram_generator.py", "--prompt_file", configs / "prompts.txt",
                        "--videos_path", samples, "--num_inference_videos_per_sample", 2], logs)

    # 8. DPO on the pairs (raw videos re-encoded every step, as data_dpo.json does)
    dpo_data = json.loads(json.dumps(raw_data))
    dpo_data["dataset_param"]["basic_parameters"].update(data_path=str(work / "data.jsonl"), data_folder=str(samples))
    dpo_data["dataloader_param"]["drop_last"] = False
    dpo_model = {"load_video_features": False, "load_text_features": False,
                 "dpo": {"histogram_path": str(work / "video_score_histogram.json"), "weight_alpha": 0,
                         "weight_beta": None, "loss_beta": 2000},
                 "predictor": predictor, "diffusion": diffusion, "text_encoder": sections["text_encoder"],
                 "ae": sections["ae"]}
    dpo = work / "dpo"
    _run("dpo", ["posttrain_dpo.py", *_training_flags(2), "--load", trained, "--finetune", "--save", dpo,
                 "--mm-data", _json(configs / "data_dpo.json", dpo_data),
                 "--mm-model", _json(configs / "posttrain_t2v_model.json", dpo_model)], logs)

    # 9. export
    exported = work / "exported_transformer"
    _run("export", ["examples/stepvideo/convert_ckpt_to_mm.py", "--source_path", dpo, "--target_path", exported,
                    "--num_layers", 2, "--mode", "export"], logs)

    # 10-14. LoRA: an adapter on the pretrained DiT, merged, exported alone, and sampled unmerged and merged
    lora = work / "lora"
    lora_flags = _training_flags(4)
    lora_flags[lora_flags.index("--lr") + 1] = lora_flags[lora_flags.index("--min-lr") + 1] = "1e-3"
    _run("lora", ["pretrain_sora.py", *lora_flags, "--load", trained, "--save", lora,
                  "--lora-target-modules", "attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv",
                  "attn2.proj_out", "--lora-r", 4, "--lora-alpha", 8,
                  "--mm-data", configs / "data_static_resolution.json",
                  "--mm-model", configs / "pretrain_t2v_model.json"], logs)
    merged = work / "lora_merged"
    _run("lora-merge", ["examples/stepvideo/convert_ckpt_to_mm.py", "--source_path", trained, "--lora-load", lora,
                        "--target_path", merged, "--tp_size", 1, "--num_layers", 2, "--mode", "merge"], logs)
    peft = work / "lora_peft"
    _run("lora-peft", ["examples/stepvideo/convert_ckpt_to_mm.py", "--lora-load", lora, "--target_path", peft,
                       "--mode", "export", "--save-lora-to-hf"], logs)
    lora_samples, merged_samples = work / "lora_samples", work / "lora_merged_samples"
    for stage, out, load, extra in (("lora-infer", lora_samples, trained, ["--lora-load", lora]),
                                    ("merged-infer", merged_samples, merged, [])):
        cfg = dict(infer_model, save_path=str(out))
        _run(stage, ["inference_sora.py", "--mm-model", _json(configs / f"{stage}_model.json", cfg),
                     "--load", load, *infer_flags, *extra], logs, **latents)
    moved, gap = _lora_check(samples, lora_samples, merged_samples)
    print(f"  LoRA: the adapter moves the final latents by {moved:.3g} (max |diff| vs no adapter); merged and "
          f"unmerged differ by {gap:.2g}")

    print(f"done in {time.time() - start:.0f} s:\n"
          f"  videos      {samples} (video_0..3.mp4, video_grid.mp4)\n"
          f"  pairs       {work / 'data.jsonl'}, {work / 'video_score_histogram.json'}\n"
          f"  checkpoints {trained}, {dpo}, {lora} (LoRA adapter), {merged} (merged)\n"
          f"  exported    {exported} (official diffusers layout), {peft} (the adapter, peft-style)\n"
          f"  logs        {logs}")
    return 0


def _lora_check(base: Path, unmerged: Path, merged: Path):
    """(how far the adapter moved the latents, how far merged is from unmerged); stops when the adapter changed
    nothing or merging changed the result beyond fp32 rounding."""
    import torch

    moved = gap = 0.0
    for i in range(4):
        b, u, m = (torch.load(folder / f"latents_{i}.pt").float() for folder in (base, unmerged, merged))
        moved = max(moved, (u - b).abs().max().item())
        gap = max(gap, (m - u).abs().max().item() / max(1.0, u.abs().max().item()))
    if moved == 0.0 or gap > 1e-4:
        raise SystemExit(f"LoRA check failed: the adapter moved the latents by {moved}, merged vs unmerged {gap}")
    return moved, gap


if __name__ == "__main__":
    sys.exit(main())
