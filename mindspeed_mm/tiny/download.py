"""A whole tiny StepVideo download (t2v or ti2v) in the official layout, with matching widths.

    python -m mindspeed_mm.tiny.download OUT_DIR [--task t2v|i2v] [--seed 0]

writes

    OUT_DIR/hunyuan_clip/{clip_text_encoder,tokenizer}/   tiny BERT + vocab
    OUT_DIR/step_llm/                                      tiny Step-LLM, shards + index + SentencePiece model
    OUT_DIR/transformer/                                   tiny DiT (config.json, shards + index)
    OUT_DIR/vae/vae_v2.safetensors                         tiny VAE
    OUT_DIR/model_sections.json                            the model-JSON sections that load them

The widths agree the way the real ones do: the DiT's caption_channels are the Step-LLM and BERT
hidden sizes, and its in_channels are the VAE's latent channels. Every model loads through the
same `from_pretrained` code as the released weights, so the CPU demo and the tests exercise the
real loaders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

from .dit import write_tiny_dit
from .text_encoders import write_tiny_hunyuan_clip, write_tiny_step_llm
from .vae import TINY_VAE_CONFIG, write_vae_weights

TINY_WIDTHS = {"llm_hidden": 64, "clip_hidden": 32, "dit_heads": 4, "dit_head_dim": 16, "dit_layers": 2}


def write_tiny_download(out_dir, task: str = "t2v", seed: int = 0) -> Dict:
    """Write the folders listed in the module docstring; return the model-JSON sections that load them."""
    if task not in ("t2v", "i2v"):
        raise ValueError(f"task {task!r} must be 't2v' or 'i2v'.")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    w = TINY_WIDTHS
    write_tiny_step_llm(str(root / "step_llm"), hidden_size=w["llm_hidden"], seed=seed)
    write_tiny_hunyuan_clip(str(root / "hunyuan_clip"), hidden_size=w["clip_hidden"], seed=seed)
    ae = write_vae_weights(root / "vae", seed=seed)
    ae.update({"dtype": "fp32"})
    write_tiny_dit(root / "transformer", num_shards=2, seed=seed, num_layers=w["dit_layers"],
                   num_heads=w["dit_heads"], head_dim=w["dit_head_dim"], in_channels=TINY_VAE_CONFIG["z_channels"],
                   caption_channels=(w["llm_hidden"], w["clip_hidden"]), use_additional_conditions=task == "i2v")
    sections = {
        "predictor": {"model_id": "stepvideodit", "from_pretrained": str(root / "transformer"), "dtype": "fp32",
                      "num_layers": w["dit_layers"], "num_heads": w["dit_heads"], "head_dim": w["dit_head_dim"],
                      "channel_split": [w["dit_head_dim"] // 2, w["dit_head_dim"] // 4, w["dit_head_dim"] // 4],
                      "in_channels": TINY_VAE_CONFIG["z_channels"], "out_channels": TINY_VAE_CONFIG["z_channels"],
                      "use_additional_conditions": task == "i2v",
                      "caption_channels": [w["llm_hidden"], w["clip_hidden"]]},
        "ae": ae,
        "text_encoder": [
            {"model_id": "StepLLmModel", "hub_backend": "hf", "from_pretrained": str(root / "step_llm"),
             "dtype": "fp32"},
            {"model_id": "BertModel", "hub_backend": "hf", "from_pretrained": str(root / "hunyuan_clip" /
                                                                                  "clip_text_encoder"),
             "dtype": "float32"},
        ],
        "tokenizer": [
            {"autotokenizer_name": "stepchat", "hub_backend": "hf",
             "from_pretrained": str(root / "step_llm" / "step1_chat_tokenizer.model"), "model_max_length": 320},
            {"autotokenizer_name": "BertTokenizer", "hub_backend": "hf",
             "from_pretrained": str(root / "hunyuan_clip" / "tokenizer"), "model_max_length": 77},
        ],
    }
    (root / "model_sections.json").write_text(json.dumps(sections, indent=2) + "\n")
    return sections


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=["t2v", "i2v"], default="t2v")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_download(args.out_dir, args.task, args.seed)
    print(f"wrote a tiny StepVideo {args.task} download to {args.out_dir} (see model_sections.json)")


if __name__ == "__main__":
    main()
