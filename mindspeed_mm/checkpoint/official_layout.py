"""The official download layout, printed by every "weights not found" error."""

from __future__ import annotations

import os

from ..errors import MindSpeedMMError

OFFICIAL_LAYOUT = """\
Expected layout of the official download (stepfun-ai/stepvideo-t2v or stepvideo-ti2v):
   stepvideo-ti2v/t2v
   ├── hunyuan_clip
   │   ├── clip_text_encoder
   │   │   ├── config.json
   │   │   └── pytorch_model.bin
   │   └── tokenizer
   │       ├── special_tokens_map.json
   │       ├── tokenizer_config.json
   │       ├── vocab.txt
   │       └── vocab_org.txt
   ├── step_llm
   │   ├── config.json
   │   ├── model-00001-of-00009.safetensors ... model-00009-of-00009.safetensors
   │   ├── model.safetensors.index.json
   │   └── step1_chat_tokenizer.model
   ├── transformer
   │   ├── config.json
   │   ├── diffusion_pytorch_model-00001-of-00006.safetensors ... -00006-of-00006.safetensors
   │   └── diffusion_pytorch_model.safetensors.index.json
   └── vae
       ├── vae.safetensors
       └── vae_v2.safetensors"""


class WeightsNotFoundError(MindSpeedMMError, FileNotFoundError):
    """A weights path that does not exist or lacks a file; the message shows the expected layout."""


def require_path(path: str, what: str, key: str = "from_pretrained", is_dir: bool = False) -> str:
    """Return `path` if it exists (as a folder when `is_dir`), else raise with the official layout."""
    ok = os.path.isdir(path) if is_dir else os.path.exists(path)
    if not path or not ok:
        kind = "folder" if is_dir else "path"
        raise WeightsNotFoundError(
            f"{what}: {kind} '{path}' ({key}) does not exist.\n{OFFICIAL_LAYOUT}\n"
            f"Set {key} to the matching path of your download."
        )
    return path


def require_file(folder: str, name: str, what: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"{what}: '{folder}' has no {name}.\n{OFFICIAL_LAYOUT}\n"
            f"Point from_pretrained at the folder that holds {name}."
        )
    return path
