"""Synthetic feature datasets and configs for training tests (no extraction needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mindspeed_mm.tiny.dit import write_tiny_dit

TINY_DIT = dict(num_layers=2, num_heads=4, head_dim=8, in_channels=4, caption_channels=(16, 8))
FEATURE_SHAPE = (2, 4, 2, 2)  # latent frames, channels, height, width


def write_feature_dataset(root: Path, samples: int = 8, i2v: bool = False, seed: int = 0) -> Path:
    """`samples` .pt feature files plus data.jsonl, in the layout feature extraction writes."""
    gen = torch.Generator().manual_seed(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        valid = 3 + i % 5
        mask = torch.zeros(1, 10, dtype=torch.long)
        mask[0, :valid] = 1
        data = {"video": torch.randn(*FEATURE_SHAPE, generator=gen),
                "prompt_ids": [torch.randn(1, 10, 16, generator=gen), torch.randn(1, 5, 8, generator=gen)],
                "prompt_mask": [mask, torch.ones(1, 5, dtype=torch.long)]}
        if i2v:
            cond = torch.zeros(*FEATURE_SHAPE)
            cond[0] = torch.randn(*FEATURE_SHAPE[1:], generator=gen)
            data["image_latents"] = cond
        torch.save(data, root / "features" / f"s{i}.pt")
        rows.append({"file": f"features/s{i}.pt", "captions": f"sample {i}"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_empty_prompt(root, gen)
    return root


def write_empty_prompt(root: Path, gen: torch.Generator) -> Path:
    """The empty prompt's states as feature extraction writes them (one valid step_llm token, every CLIP one)."""
    from mindspeed_mm.config.data import EMPTY_PROMPT_FILE

    mask = torch.zeros(1, 10, dtype=torch.long)
    mask[0, 0] = 1
    path = root / EMPTY_PROMPT_FILE
    torch.save({"prompt_ids": [torch.randn(1, 10, 16, generator=gen), torch.randn(1, 5, 8, generator=gen)],
                "prompt_mask": [mask, torch.ones(1, 5, dtype=torch.long)]}, path)
    return path


def write_training_configs(root: Path, i2v: bool = False, samples: int = 8) -> dict:
    """A tiny official DiT, a feature dataset, and the data/model JSON files for pretrain_sora.py."""
    dit = write_tiny_dit(root / "transformer", num_shards=1, use_additional_conditions=i2v, **TINY_DIT)
    data_root = write_feature_dataset(root / "features_data", samples=samples, i2v=i2v)
    data = {"dataset_param": {"dataset_type": "feature",
                              "basic_parameters": {"data_path": str(data_root / "data.jsonl"),
                                                   "data_folder": str(data_root)}},
            "dataloader_param": {"dataloader_mode": "sampler", "shuffle": False, "drop_last": True}}
    model = {"task": "i2v" if i2v else "t2v", "load_video_features": True, "load_text_features": True,
             "predictor": {"model_id": "stepvideodit", "from_pretrained": str(dit), "dtype": "fp32",
                           "num_layers": TINY_DIT["num_layers"], "num_heads": TINY_DIT["num_heads"],
                           "head_dim": TINY_DIT["head_dim"], "channel_split": [4, 2, 2],
                           "in_channels": TINY_DIT["in_channels"], "out_channels": TINY_DIT["in_channels"],
                           "use_additional_conditions": i2v, "caption_channels": list(TINY_DIT["caption_channels"])},
             "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0}}
    paths = {"data": root / "data.json", "model": root / "model.json", "dit": dit}
    paths["data"].write_text(json.dumps(data, indent=2))
    paths["model"].write_text(json.dumps(model, indent=2))
    return paths


def train_argv(paths: dict, save: Path, iters: int, gbs: int = 2, mbs: int = 1, tp: int = 1, cp: int = 1,
               extra=()) -> list:
    return ["--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp),
            "--context-parallel-algo", "ulysses_cp_algo", "--micro-batch-size", str(mbs),
            "--global-batch-size", str(gbs), "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant",
            "--weight-decay", "1e-2", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--clip-grad", "1.0",
            "--train-iters", str(iters), "--no-gradient-accumulation-fusion", "--num-workers", "0",
            "--mm-data", str(paths["data"]), "--mm-model", str(paths["model"]), "--log-interval", "1",
            "--save", str(save), "--save-interval", "2", "--ckpt-format", "torch", "--seed", "1234",
            "--distributed-backend", "nccl", *extra]


def _pair_rows(root: Path) -> None:
    """Rewrite root/data.jsonl as preference pairs of consecutive samples (winner, loser)."""
    rows = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    pairs = [{"file": rows[i]["file"], "file_rejected": rows[i + 1]["file"], "captions": rows[i]["captions"],
              "score": 0.8, "score_rejected": 0.3} for i in range(0, len(rows), 2)]
    (root / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def histogram_json(path: Path) -> Path:
    path.write_text(json.dumps({"0.2-0.30000000000000004": 1, "0.30000000000000004-0.4": 1, "total_num": 2,
                                "max_num": 1, "min_bin": 2, "max_bin": 4, "bin_width": 0.1, "bin_size": 2}))
    return path


def write_dpo_configs(root: Path, weight_alpha: float = 0.0, i2v: bool = False) -> dict:
    """A tiny official DiT, 4 feature pairs (i2v: each member with its own first-frame condition) and the DPO
    model JSON (loss_beta 1)."""
    paths = write_training_configs(root / "w", i2v=i2v, samples=8)
    _pair_rows(root / "w" / "features_data")
    model = json.loads(paths["model"].read_text())
    model["dpo"] = {"histogram_path": str(histogram_json(root / "hist.json")), "weight_alpha": weight_alpha,
                    "weight_beta": None, "loss_beta": 1.0}
    paths["model"].write_text(json.dumps(model))
    return paths


def frozen_base_spec(spec):
    """`spec` whose build also snapshots the module's frozen (non-LoRA) parameters: (the spec, a box that then
    holds "module" and "base"). After training, `base_untouched(box)` lists the parameters that changed."""
    from mindspeed_mm.training.spec import TrainSpec

    box = {}

    def build(args):
        module, loss_fn = spec.build(args)
        box["module"] = module
        box["base"] = {n: p.detach().clone() for n, p in module.named_parameters()
                       if not n.endswith(("lora_A", "lora_B"))}
        return module, loss_fn

    return TrainSpec(spec.name, spec.entry, build), box


def changed_base_parameters(box) -> list:
    params = dict(box["module"].named_parameters())
    return [n for n, before in box["base"].items() if not torch.equal(params[n].detach(), before)]
