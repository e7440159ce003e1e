"""The user guide's era of launch flags and JSON configs (MindSpeed-MM's StepVideo example, May 2025), as Python data.

Written from the guide's facts (key names, values, flag sets), not copied: `*_flags` return the flag lists of the
era's launchers with their shell variables filled in, and the other functions return the era's JSON objects with
the paths pointed at a `weights` folder that `fake_weights` lays out (empty files: enough for the path checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

# --- launch flags -----------------------------------------------------------------------------


def gpt_flags(num_layers: int, hidden_size: int, num_heads: int, seq_length: int = 1024) -> List[str]:
    """The Megatron GPT block every era launcher passes (MindSpeed-MM did not use it for the DiT)."""
    return ["--num-layers", str(num_layers), "--hidden-size", str(hidden_size), "--num-attention-heads",
            str(num_heads), "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
            "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "0", "--position-embedding-type", "rope", "--rotary-base", "500000", "--swiglu",
            "--no-masked-softmax-fusion"]


def _training_tail(load: str, save: str, recompute_layers: int, workers: int) -> List[str]:
    return ["--lr", "1e-5", "--min-lr", "1e-5", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-15",
            "--lr-decay-style", "constant", "--weight-decay", "1e-2", "--lr-warmup-init", "1e-5", "--lr-warmup-iters",
            "0", "--clip-grad", "1.0", "--train-iters", "5000", "--no-gradient-accumulation-fusion", "--load", load,
            "--bf16", "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers",
            str(recompute_layers), "--use-distributed-optimizer", "--allow-tf32", "--num-workers", str(workers),
            "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "10000", "--eval-iters", "10",
            "--save", save, "--distributed-backend", "nccl"]


def _parallel(tp: int, gbs: int, vp: Optional[int] = 1) -> List[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", "1"]
    if vp is not None:
        flags += ["--virtual-pipeline-model-parallel-size", str(vp)]
    return flags + ["--context-parallel-size", "1", "--micro-batch-size", "1", "--global-batch-size", str(gbs)]


def mm_flags(data=None, model=None, tool=None) -> List[str]:
    out = []
    for flag, path in (("--mm-data", data), ("--mm-model", model), ("--mm-tool", tool)):
        if path is not None:
            out += [flag, str(path)]
    return out


def pretrain_flags(data, model, tool, load, save, tp: int = 8, gbs: int = 1) -> List[str]:
    """pretrain_t2v.sh / pretrain_i2v.sh (their GPT block says 48 layers, 6144 wide, 48 heads)."""
    return (_parallel(tp, gbs) + gpt_flags(48, 6144, 48) + _training_tail(str(load), str(save), 48, 8)
            + mm_flags(data, model, tool))


def dpo_flags(data, model, tool, load, save, layers: int = 32, hidden: int = 2304, heads: int = 24) -> List[str]:
    """posttrain_t2v_dpo.sh (its GPT block says 32 layers, 2304 wide, 24 heads)."""
    return (_parallel(1, 1) + gpt_flags(layers, hidden, heads) + _training_tail(str(load), str(save), 32, 0)
            + mm_flags(data, model, tool))


def inference_flags(model, load, tp: int = 4, layers: int = 28, hidden: int = 1152, heads: int = 16) -> List[str]:
    """inference_t2v.sh / inference_i2v.sh (copied GPT block: 28 layers, 1152 wide, 16 heads; no --seed)."""
    return (mm_flags(model=model) + _parallel(tp, 1, vp=None) + gpt_flags(layers, hidden, heads)
            + ["--lr", "2e-5", "--min-lr", "2e-5", "--train-iters", "5010", "--weight-decay", "0", "--clip-grad", "1",
               "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--no-gradient-accumulation-fusion", "--no-load-optim",
               "--no-load-rng", "--no-save-optim", "--no-save-rng", "--bf16", "--load", str(load),
               "--distributed-timeout-minutes", "20"])


def feature_flags(data, model, tool) -> List[str]:
    """feature_extraction.sh / feature_extraction_i2v.sh."""
    return (_parallel(1, 1, vp=None) + ["--num-workers", "8"] + gpt_flags(48, 6144, 48, seq_length=24)
            + mm_flags(data, model, tool) + ["--distributed-backend", "nccl"])


# --- JSON configs ----------------------------------------------------------------------------


def fake_weights(root: Path) -> Path:
    """The download layout the configs point at, with empty files."""
    for sub in ("step_llm", "hunyuan_clip/clip_text_encoder", "hunyuan_clip/tokenizer", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "step_llm" / "step1_chat_tokenizer.model").write_bytes(b"")
    (root / "vae" / "vae_v2.safetensors").write_bytes(b"")
    return root


def tokenizers(weights) -> list:
    return [{"autotokenizer_name": "stepchat", "hub_backend": "hf",
             "from_pretrained": f"{weights}/step_llm/step1_chat_tokenizer.model", "model_max_length": 320},
            {"autotokenizer_name": "BertTokenizer", "hub_backend": "hf",
             "from_pretrained": f"{weights}/hunyuan_clip/tokenizer", "model_max_length": 77}]


def text_encoders(weights) -> list:
    return [{"model_id": "StepLLmModel", "hub_backend": "hf", "from_pretrained": f"{weights}/step_llm/",
             "dtype": "bf16"},
            {"model_id": "BertModel", "hub_backend": "hf",
             "from_pretrained": f"{weights}/hunyuan_clip/clip_text_encoder", "dtype": "float32"}]


def ae(weights, i2v: bool = False) -> dict:
    out = {"model_id": "stepvideovae", "from_pretrained": f"{weights}/vae/vae_v2.safetensors", "dtype": "bf16",
           "z_channels": 64, "frame_len": 17, "version": 2}
    if i2v:
        out["i2v_processor"] = {"processor_id": "stepvideo_i2v_processor"}
    return out


def predictor(num_layers: int = 48, num_heads: int = 48, head_dim: int = 128, i2v: bool = False) -> dict:
    """The era's predictor section: num_attention_heads / attention_head_dim."""
    return {"model_id": "stepvideodit", "from_pretrained": None, "dtype": "bf16", "num_layers": num_layers,
            "num_attention_heads": num_heads, "attention_head_dim": head_dim, "channel_split": [64, 32, 32],
            "in_channels": 64, "out_channels": 64, "patch_size": 1, "patch_size_thw": [1, 1, 1],
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "attention_norm_type": "rmsnorm",
            "attention_norm_elementwise_affine": True, "attention_norm_eps": 1e-6, "fa_layout": "bsnd",
            "use_additional_conditions": i2v, "caption_channels": [6144, 1024]}


FLOW_MATCH = {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0,
              "reverse": False, "solver": "euler"}
DDPM = {"model_id": "DDPM", "num_train_steps": 1000, "guidance_scale": 7.5, "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "timestep_spacing": "leading", "device": "npu", "snr_gamma": 5.0,
        "t_sample_method": "explicit_uniform"}


def pretrain_model(weights, num_layers: int = 24, i2v: bool = False) -> dict:
    out = {"load_video_features": True, "load_text_features": True, "enable_encoder_dp": False,
           "predictor": predictor(num_layers, i2v=i2v), "diffusion": dict(FLOW_MATCH),
           "text_encoder": text_encoders(weights), "ae": ae(weights, i2v)}
    if i2v:
        out = {"task": "i2v", **out}
    return out


def inference_model(weights, prompt, save_path, seed: int = 1234, i2v: bool = False, image=None) -> dict:
    pipeline = {"version": "stepvideo", "use_attention_mask": True, "input_size": [102 if i2v else 204, 544, 992],
                "guidance_scale": 9.0, "model_type": "i2v" if i2v else "t2v", "seed": seed}
    if i2v:
        pipeline["motion_score"] = 5.0
    out = {"predictor": {**predictor(i2v=i2v), "dropout": 0.0, "norm_type": "ada_norm_single"}, "ae": ae(weights),
           "tokenizer": tokenizers(weights), "text_encoder": text_encoders(weights),
           "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1,
                         "num_inference_timesteps": 50, "shift": 13.0, "reverse": False, "solver": "euler"},
           "pipeline_config": pipeline, "unload_text_encoder": True, "micro_batch_size": 1, "frame_interval": 1,
           "save_path": str(save_path), "fps": 25, "prompt": str(prompt), "num_inference_videos_per_sample": 1,
           "use_prompt_preprocess": False, "pipeline_class": "StepVideoPipeline", "device": "npu", "dtype": "bf16"}
    if image is not None:
        out["image"] = str(image)
    return out


def dpo_model(weights, histogram, num_layers: int = 1, num_heads: int = 1) -> dict:
    """posttrain_t2v_model.json: histgram_path, a 1-layer 1-head predictor and the DDPM diffusion section."""
    a = ae(weights)
    a.pop("frame_len")
    return {"load_video_features": False, "load_text_features": False, "enable_encoder_dp": False,
            "dpo": {"histgram_path": str(histogram), "weight_alpha": 0, "weight_beta": None, "loss_beta": 2000},
            "predictor": {**predictor(num_layers, num_heads), "dropout": 0.0, "norm_type": "ada_norm_single"},
            "diffusion": dict(DDPM), "text_encoder": text_encoders(weights), "ae": a, "patch": {"ae_float32": True}}


def feature_model(weights, i2v: bool = False) -> dict:
    return {"text_encoder": text_encoders(weights), "ae": ae(weights, i2v)}


def preprocess(num_frames: int = 136, height: int = 544, width: int = 992, skip: int = 0) -> dict:
    """The era's preprocess_parameters: data_process_type, fps, dataloader_num_workers."""
    return {"data_process_type": "CogvideoX", "video_reader_type": "DecordVideo", "fps": 8, "skip_frame_num": skip,
            "num_frames": num_frames, "max_height": height, "max_width": width, "dataloader_num_workers": 0,
            "train_pipeline": {"video": [], "image": []}}


LOADER = {"dataloader_mode": "sampler", "sampler_type": "SequentialSampler", "shuffle": False, "drop_last": True,
          "pin_memory": True, "group_frame": False, "group_resolution": False, "collate_param": {}}


def feature_data(weights, data_path, data_folder, num_frames: int = 136) -> dict:
    """feature_extract/data.json: raw videos, standard storage."""
    return {"dataset_param": {"dataset_type": "t2v",
                              "basic_parameters": {"data_path": str(data_path), "data_folder": str(data_folder),
                                                   "data_storage_mode": "standard"},
                              "preprocess_parameters": preprocess(num_frames), "use_text_processer": True,
                              "enable_text_preprocessing": False, "tokenizer_config": tokenizers(weights)},
            "dataloader_param": dict(LOADER)}


def pretrain_data(weights, data_txt, num_frames: int = 136) -> dict:
    """{t2v,i2v}/data_static_resolution.json: sorafeatured features listed by data.txt."""
    pre = preprocess(num_frames)
    pre["skip_define_frame_index"] = True
    return {"dataset_param": {"dataset_type": "t2v",
                              "basic_parameters": {"data_path": str(data_txt), "data_storage_mode": "sorafeatured",
                                                   "use_text_feature": True, "use_video_feature": True},
                              "preprocess_parameters": pre, "use_text_processer": True,
                              "enable_text_preprocessing": False, "tokenizer_config": tokenizers(weights)},
            "dataloader_param": dict(LOADER)}


def dpo_data(weights, data_path, data_folder) -> dict:
    """t2v/data_dpo.json: raw videos, use_feature_data false, 480x480, skip 3 (no shuffle key)."""
    loader = {k: v for k, v in LOADER.items() if k != "shuffle"}
    return {"dataset_param": {"dataset_type": "t2v", "use_feature_data": False,
                              "basic_parameters": {"data_path": str(data_path), "data_folder": str(data_folder),
                                                   "data_storage_mode": "standard"},
                              "preprocess_parameters": preprocess(136, 480, 480, skip=3), "use_text_processer": True,
                              "enable_text_preprocessing": False, "tokenizer_config": tokenizers(weights)},
            "dataloader_param": loader}


def tools(save_path) -> dict:
    return {"sorafeature": {"extract_video_feature": True, "extract_text_feature": True, "save_path": str(save_path),
                            "data_storage_mode": "sorafeatured"}}


def data_txt_line(folder) -> str:
    """The era's data.txt line: the feature folder, then its data.jsonl."""
    return f"{folder},{folder}/data.jsonl"


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False), encoding="utf-8")
    return path
