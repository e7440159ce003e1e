"""`mindspeed_mm.cli.run`: a user error (MindSpeedMMError) is one `error: ...` line and exit 2, printed once per
job when every rank raises it; any other exception is a bug and keeps its traceback. Also: user-input errors
across the package are MindSpeedMMErrors that still derive from the builtin they used to be."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mindspeed_mm.arguments import ArgumentError, parse_args
from mindspeed_mm.cli import run
from mindspeed_mm.config import ConfigError
from mindspeed_mm.config.base import from_dict
from mindspeed_mm.config.model import DiffusionConfig, DPOConfig, TokenizerConfig
from mindspeed_mm.errors import MindSpeedMMError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def rank0(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _raising(exc):
    def main(argv):
        raise exc
    return main


# ---- the printing rule ----------------------------------------------------------------------


def test_project_error_is_one_line_and_exit_2(rank0, capsys):
    assert run(_raising(ConfigError("model.json: key 'predictor.dtype': 'fp8' is not one of 'bf16'."))) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: model.json: key 'predictor.dtype': 'fp8' is not one of 'bf16'.\n"
    assert run(lambda argv: None) == 0 and run(lambda argv: 3) == 3


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError("a bug"), RuntimeError("a bug"),
                                 KeyError("a bug")], ids=lambda e: type(e).__name__)
def test_other_exceptions_keep_their_traceback(rank0, capsys, bug):
    with pytest.raises(type(bug)) as err:
        run(_raising(bug))
    assert err.value is bug and err.traceback  # re-raised as is, with its frames
    assert "error:" not in capsys.readouterr().err


def test_other_ranks_print_only_their_own_errors(monkeypatch, capsys):
    class ShardError(MindSpeedMMError, ValueError):
        pass

    monkeypatch.setenv("RANK", "3")
    assert run(_raising(ArgumentError("--lr must be given for training."))) == 2
    assert capsys.readouterr().err == ""  # same on all ranks: rank 0 prints it
    assert run(_raising(ShardError("/ckpt/mp_rank_01/model_optim_rng.pt is truncated"))) == 2
    assert capsys.readouterr().err == "error (rank 3): /ckpt/mp_rank_01/model_optim_rng.pt is truncated\n"


# ---- user-input errors are project errors (and still the builtin they were) ------------------


def _seed_flag():
    parse_args(["--seed", "-1"], world_size=1)


def _device_env():
    from mindspeed_mm.runtime.device import detect_device_type

    os.environ["MINDSPEED_MM_DEVICE"] = "tpu"
    try:
        detect_device_type()
    finally:
        os.environ.pop("MINDSPEED_MM_DEVICE")


def _scheduler():
    from mindspeed_mm.models.diffusion import FlowMatchScheduler

    FlowMatchScheduler(shift=0.0)


def _vae_config():
    from mindspeed_mm.models.ae import StepVideoVAE

    StepVideoVAE(device="meta", frame_len=16)


def _vae_path(tmp):
    from mindspeed_mm.models.ae.checkpoint import resolve_weights_file

    resolve_weights_file(str(tmp / "nope.safetensors"), 2)


def _text_encoder_pairing():
    from mindspeed_mm.config.model import TextEncoderConfig
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    encoders = [TextEncoderConfig("BertModel", "x"), TextEncoderConfig("StepLLmModel", "y")]
    StepVideoTextEncoder.from_configs(encoders, [])


def _step_llm_config(tmp):
    from mindspeed_mm.models.text_encoder import StepLLMConfig

    (tmp / "config.json").write_text('{"hidden_size": 64}')
    StepLLMConfig.from_json(str(tmp / "config.json"))


def _dit_channels():
    from mindspeed_mm.config.model import PredictorConfig
    from mindspeed_mm.models.predictor import StepVideoDiT

    cfg = PredictorConfig(num_layers=1, num_heads=2, head_dim=16, channel_split=[8, 4, 4], in_channels=4,
                          out_channels=4, caption_channels=[8, 8], dtype="fp32")
    dit = StepVideoDiT(cfg, device="cpu")
    dit(torch.zeros(1, 1, 16, 2, 2), 0.5, [torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)],
        [torch.ones(1, 2), torch.ones(1, 2)])


def _head_dim():
    from mindspeed_mm.checkpoint.stepvideo_adapter import default_channel_split

    default_channel_split(12)


def _image(tmp):
    from mindspeed_mm.inference.images import load_image

    load_image(tmp / "missing.png")


def _histogram(tmp):
    from mindspeed_mm.dpo.histogram import load_histogram

    load_histogram(tmp / "nowhere.json")


def _prompt_file(tmp):
    from mindspeed_mm.dpo.pairs import read_prompt_file

    read_prompt_file(tmp / "prompts.txt")


def _weights_flag():
    import importlib.util

    spec = importlib.util.spec_from_file_location("histgram_generator",
                                                  REPO / "examples" / "stepvideo" / "histgram_generator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_weights(["sharpness=high"])


def _binary_json(tmp):
    from mindspeed_mm.config.base import load_json

    (tmp / "model.json").write_bytes(b"\xff\xfe\x00{")
    load_json(str(tmp / "model.json"), "--mm-model")


USER_ERRORS = [
    pytest.param(_seed_flag, ValueError, "--seed -1 must be a non-negative integer", id="seed-flag"),
    pytest.param(_device_env, ValueError, "MINDSPEED_MM_DEVICE='tpu' is not a device type", id="device-env"),
    pytest.param(_scheduler, ValueError, "diffusion.shift 0.0 must be positive", id="scheduler"),
    pytest.param(lambda: from_dict(DiffusionConfig, {"reverse": True}, source="m.json", prefix="diffusion"),
                 ValueError, "m.json: key 'diffusion': reverse = true", id="diffusion-json"),
    pytest.param(lambda: from_dict(DPOConfig, {"histogram_path": "h.json", "weight_beta": -1.0}, source="m.json",
                                   prefix="dpo"),
                 ValueError, "m.json: key 'dpo': weight_beta -1.0 must be a positive number", id="dpo-json"),
    pytest.param(lambda: from_dict(TokenizerConfig, {"autotokenizer_name": "stepchat", "from_pretrained": "t",
                                                     "model_max_length": 1}, source="m.json", prefix="tokenizer[0]"),
                 ValueError, "m.json: key 'tokenizer[0]': model_max_length 1 must leave room", id="tokenizer-json"),
    pytest.param(_vae_config, ValueError, r"frame_len 16 is not 1 + k*8", id="vae-config"),
    pytest.param(_vae_path, FileNotFoundError, "nope.safetensors' (from_pretrained) do not exist", id="vae-path"),
    pytest.param(_text_encoder_pairing, ValueError, "the text_encoder list must hold two entries",
                 id="text-encoder-list"),
    pytest.param(_step_llm_config, ValueError, "lacks required key(s) num_attention_heads", id="step-llm-config"),
    pytest.param(_dit_channels, ValueError, "latents have 16 channels but the predictor's in_channels is 4",
                 id="dit-channels"),
    pytest.param(_head_dim, ValueError, "head_dim 12: the official RoPE split", id="dit-head-dim"),
    pytest.param(_image, FileNotFoundError, "missing.png: no such image file", id="image"),
    pytest.param(_histogram, FileNotFoundError, "nowhere.json' does not exist", id="histogram"),
    pytest.param(_prompt_file, FileNotFoundError, "prompts.txt' does not exist", id="prompt-file"),
    pytest.param(_weights_flag, ValueError, "--weights: 'high' (for sharpness) is not a number", id="weights-flag"),
    pytest.param(_binary_json, ValueError, "model.json' is not a UTF-8 text file", id="binary-json"),
]


@pytest.mark.parametrize("call, builtin, message", USER_ERRORS)
def test_user_input_errors_are_project_errors(rank0, capsys, tmp_path, call, builtin, message):
    def main(argv):
        call(tmp_path) if call.__code__.co_argcount else call()

    assert run(main) == 2  # on the old code these were plain builtins (a traceback), or not checked at all
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    with pytest.raises(MindSpeedMMError) as exc:
        main(None)
    assert isinstance(exc.value, builtin)  # callers catching the builtin keep working


# ---- under torchrun ---------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys

    import torch.distributed as dist

    from mindspeed_mm.cli import run
    from mindspeed_mm.errors import MindSpeedMMError


    class ShardError(MindSpeedMMError, ValueError):
        "An error about this rank's own file."


    def main(argv):
        dist.init_process_group("gloo")
        try:
            dist.barrier()
            if argv[0] == "flag":
                from mindspeed_mm.arguments import parse_args

                parse_args(["--tensor-model-parallel-sise", "2"])  # every rank parses the same flags
            elif dist.get_rank() == 1:
                raise ShardError("/ckpt/iter_0000010/mp_rank_01/model_optim_rng.pt is truncated")
            return 0
        finally:
            dist.destroy_process_group()


    if __name__ == "__main__":
        sys.exit(run(main, sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MINDSPEED_MM_DEVICE="cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), mode]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]


def _worker_frames(proc: subprocess.CompletedProcess, script: Path) -> list:
    """Traceback frames from the workers, which torch prints as `[rankN]:   File "..."` (torchrun then prints its own
    ChildFailedError traceback; that one is not ours): any frame in the worker script or in the package."""
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if 'File "' in line and (str(script) in line or "mindspeed_mm" in line)]


def test_torchrun_prints_a_rank_identical_error_once_and_a_rank_error_with_its_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    flag = _torchrun(script, "flag")
    assert flag.returncode != 0
    assert _error_lines(flag) == ["error: unknown flag --tensor-model-parallel-sise; did you mean "
                                  "--tensor-model-parallel-size? Run with --help for the list of flags."], flag.stderr
    assert _worker_frames(flag, script) == [], flag.stderr[-3000:]

    shard = _torchrun(script, "shard")
    assert shard.returncode != 0
    assert _error_lines(shard) == ["error (rank 1): /ckpt/iter_0000010/mp_rank_01/model_optim_rng.pt is "
                                   "truncated"], shard.stderr
    assert _worker_frames(shard, script) == [], shard.stderr[-3000:]
