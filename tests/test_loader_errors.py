"""Every weights loader turns a refused pickle or a truncated/damaged file into one error naming the file.

The loaders: Megatron-layout model_optim_rng.pt (`torch_load`, the DiT's --load, the converter), the helper for
Megatron's own load of distrib_optim.pt, official DiT shards and index, Step-LLM shards and config, HunyuanCLIP
through transformers, the tokenizer files, and the converter's official input. Each case checks the error class
(a MindSpeedMMError, so `cli.run` prints it as one line), the file name and the advice; the last tests run the
converter's command line and check that the user sees one `error: ...` line and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_mm.checkpoint import (CheckpointError, checkpoint_load_errors, load_model_state_dict,
                                     save_model_state_dict)
from mindspeed_mm.checkpoint.convert import merge, split
from mindspeed_mm.errors import MindSpeedMMError
from mindspeed_mm.checkpoint.safetensors_io import WeightsFileError
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.text_encoder import (BertPromptTokenizer, HunyuanClipEncoder, StepChatTokenizer,
                                              StepLLMEncoder)
from mindspeed_mm.tiny.dit import write_tiny_dit
from mindspeed_mm.tiny.text_encoders import write_tiny_hunyuan_clip, write_tiny_step_llm

REPO = Path(__file__).resolve().parents[1]
CONVERT = REPO / "examples" / "stepvideo" / "convert_ckpt_to_mm.py"
TINY_DIT = dict(num_layers=2, num_heads=4, head_dim=8, in_channels=4, caption_channels=(16, 8))


class RemoveFile:
    """A malicious pickle: unpickling it with weights_only=False would delete `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.remove, (self.path,))


class Opaque:
    """A harmless non-tensor object, which weights_only refuses all the same."""


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _canary(tmp_path: Path) -> Path:
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    return canary


# ---- torch.load: Megatron-layout checkpoints ----------------------------------------------------


def test_refused_pickle_in_model_optim_rng_names_the_file_and_the_type(tmp_path):
    canary = _canary(tmp_path)
    ckpt = tmp_path / "ckpt"
    path = save_model_state_dict(ckpt, {"w": torch.zeros(2)}, extra={"rng_state": RemoveFile(canary)})
    for load in (lambda: load_model_state_dict(ckpt), lambda: StepVideoDiT.from_pretrained(ckpt)):
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"cannot load {path}: its pickle holds an object of type posix.remove"), msg
        assert "torch.load(weights_only=True) refuses" in msg and "Only load checkpoints you trust" in msg
        assert "weights_only=False" in msg and "--load" in msg  # how to proceed
        assert isinstance(err.value, MindSpeedMMError)
    assert canary.read_text() == "still here"

    save_model_state_dict(ckpt, {"w": torch.zeros(2)}, extra={"args": Opaque()})
    with pytest.raises(CheckpointError, match=r"its pickle holds an object of type [\w.]*Opaque, which "):
        load_model_state_dict(ckpt)


def test_truncated_or_empty_model_optim_rng(tmp_path):
    ckpt = tmp_path / "ckpt"
    path = save_model_state_dict(ckpt, {"w": torch.randn(64, 64)}, extra={"iteration": 10})
    good = path.read_bytes()
    # Cut after the first KB (torch's zip reader fails with EINVAL) or before it (PytorchStreamReader).
    for keep, cause in ((0.5, "reading it as a zip archive failed"), (0.03, "PytorchStreamReader failed")):
        path.write_bytes(good[: int(len(good) * keep)])
        with pytest.raises(CheckpointError) as err:
            StepVideoDiT.from_pretrained(ckpt)
        msg = str(err.value)
        assert msg.startswith(f"cannot load {path}: the file is truncated or damaged ({cause}"), msg
        assert "Copy the checkpoint again" in msg and "point --load at another complete iteration" in msg
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"the file is empty or truncated"):
        load_model_state_dict(ckpt)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"cannot load {path}: "):
        load_model_state_dict(ckpt)


def test_load_error_helper_for_megatron_load_parameter_state(tmp_path):
    """`checkpoint_load_errors` wraps Megatron's own `torch.load(filename)` of distrib_optim.pt."""
    canary = _canary(tmp_path)
    path = tmp_path / "distrib_optim.pt"
    torch.save({"param_state": RemoveFile(canary)}, path)
    fix = "Resume with --no-load-optim to keep the weights and start a fresh optimizer."
    with pytest.raises(CheckpointError) as err:
        with checkpoint_load_errors(path, fix=fix):
            torch.load(path)  # what DistributedOptimizer.load_parameter_state does on DP rank 0
    msg = str(err.value)
    assert msg.startswith(f"cannot load {path}: its pickle holds an object of type posix.remove") and msg.endswith(fix)
    assert canary.read_text() == "still here"

    torch.save({"param_state": torch.ones(8)}, path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=r"the file is truncated or damaged"):
        with checkpoint_load_errors(path, fix=fix):
            torch.load(path)
    # Anything that is not about the file keeps its own type and traceback.
    with pytest.raises(RuntimeError, match="^size mismatch") as err:
        with checkpoint_load_errors(path):
            raise RuntimeError("size mismatch for a parameter")
    assert not isinstance(err.value, MindSpeedMMError)


# ---- safetensors: the DiT, Step-LLM, and the converter's official input -------------------------


def test_truncated_dit_shard_and_index(tmp_path):
    folder = write_tiny_dit(tmp_path / "transformer", num_shards=2, **TINY_DIT)
    shard = _truncate(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(WeightsFileError) as err:
        StepVideoDiT.from_pretrained(folder)
    msg = str(err.value)
    assert msg.startswith(f"StepVideo DiT: cannot read '{shard}': the file is truncated (Error while "), msg
    assert "Download the file again" in msg
    index = _truncate(folder / "diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(WeightsFileError, match=rf"StepVideo DiT: '{index}' is not valid JSON \(.* line \d+"):
        StepVideoDiT.from_pretrained(folder)


def test_truncated_step_llm_shard_config_and_tokenizer(tmp_path):
    folder = tmp_path / "step_llm"
    write_tiny_step_llm(str(folder), hidden_size=32, num_attention_heads=4, num_attention_groups=2,
                        num_layers=2, ffn_hidden_size=64, num_shards=2)
    shard = _truncate(folder / "model-00001-of-00002.safetensors", keep=0.9)
    with pytest.raises(WeightsFileError) as err:
        StepLLMEncoder.from_pretrained(str(folder))
    msg = str(err.value)
    assert msg.startswith(f"Step-LLM text encoder: cannot read '{shard}': the file is truncated"), msg
    config = _truncate(folder / "config.json")
    with pytest.raises(WeightsFileError, match=rf"Step-LLM text encoder: '{config}' is not valid JSON"):
        StepLLMEncoder.from_pretrained(str(folder))
    model = _truncate(folder / "step1_chat_tokenizer.model")
    with pytest.raises(WeightsFileError, match=rf"StepChat tokenizer: cannot read '{model}' as a SentencePiece "
                                               rf"model .* truncated"):
        StepChatTokenizer(str(model))


def test_hunyuan_clip_truncated_refused_and_damaged_tokenizer(tmp_path):
    root = tmp_path / "hunyuan_clip"
    write_tiny_hunyuan_clip(str(root))
    encoder = root / "clip_text_encoder"
    weights = encoder / "pytorch_model.bin"
    good = weights.read_bytes()
    _truncate(weights)
    with pytest.raises(WeightsFileError) as err:
        HunyuanClipEncoder.from_pretrained(str(encoder))
    msg = str(err.value)
    assert msg.startswith(f"HunyuanCLIP text encoder (hunyuan_clip/clip_text_encoder): cannot load '{weights}': "
                          f"the file is truncated or damaged"), msg
    canary = _canary(tmp_path)
    torch.save({"embeddings.word_embeddings.weight": RemoveFile(canary)}, weights)
    with pytest.raises(WeightsFileError, match=r"its pickle holds an object of type posix.remove"):
        HunyuanClipEncoder.from_pretrained(str(encoder))
    assert canary.read_text() == "still here"
    weights.write_bytes(good)
    HunyuanClipEncoder.from_pretrained(str(encoder))  # the folder itself is fine
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"has config.json but no weights"):
        HunyuanClipEncoder.from_pretrained(str(encoder))
    tok_config = _truncate(root / "tokenizer" / "tokenizer_config.json")
    with pytest.raises(WeightsFileError, match=rf"HunyuanCLIP tokenizer: '{tok_config}' is not valid JSON"):
        BertPromptTokenizer(str(root / "tokenizer"))


def test_converter_names_truncated_and_refused_inputs(tmp_path):
    src = write_tiny_dit(tmp_path / "transformer", num_shards=2, **TINY_DIT)
    good = split(src, tmp_path / "mm", tp_size=1, pp_layers=[2], num_layers=2, log=lambda m: None)
    shard = _truncate(src / "diffusion_pytorch_model-00001-of-00002.safetensors")
    with pytest.raises(WeightsFileError, match=rf"^--source_path: cannot read '{shard}': the file is truncated"):
        split(src, tmp_path / "out", tp_size=1, pp_layers=[2], num_layers=2, log=lambda m: None)
    assert not (tmp_path / "out").exists()

    canary = _canary(tmp_path)
    rank_file = Path(good) / "release" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"model": {}, "args": RemoveFile(canary)}, rank_file)
    with pytest.raises(CheckpointError) as err:
        merge(good, tmp_path / "merged", tp_size=1, pp_layers=[2], num_layers=2, log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith(f"cannot load {rank_file}: its pickle holds an object of type posix.remove"), msg
    assert "point --source_path at another complete checkpoint" in msg
    assert canary.read_text() == "still here" and not (tmp_path / "merged").exists()


# ---- what the user sees on the command line -----------------------------------------------------


def _convert(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_command_line_shows_one_line_naming_the_file(tmp_path):
    src = write_tiny_dit(tmp_path / "transformer", num_shards=2, **TINY_DIT)
    good = split(src, tmp_path / "mm", tp_size=1, pp_layers=[2], num_layers=2, log=lambda m: None)
    shard = _truncate(src / "diffusion_pytorch_model-00002-of-00002.safetensors")
    line = _one_error_line(_convert("--source_path", src, "--target_path", tmp_path / "out", "--mode", "split",
                                    "--num_layers", 2))
    assert line.startswith(f"error: --source_path: cannot read '{shard}': the file is truncated"), line

    canary = _canary(tmp_path)
    rank_file = Path(good) / "release" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"model": {}, "rng_state": RemoveFile(canary)}, rank_file)
    line = _one_error_line(_convert("--source_path", good, "--target_path", tmp_path / "out", "--mode", "export"))
    assert line.startswith(f"error: cannot load {rank_file}: its pickle holds an object of type posix.remove"), line
    assert canary.read_text() == "still here"
    json.dumps(line)  # one printable line
