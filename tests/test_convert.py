"""Checkpoint conversion: bitwise round trips, the seed's command lines, and every error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindspeed_mm.checkpoint.conversion_checks import ConversionError
from mindspeed_mm.checkpoint.convert import export, merge, split
from mindspeed_mm.checkpoint.megatron_layout import CheckpointError
from mindspeed_mm.checkpoint.safetensors_io import CheckpointMismatchError
from mindspeed_mm.tiny.dit import write_tiny_dit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "stepvideo" / "convert_ckpt_to_mm.py"
TINY = dict(num_heads=4, head_dim=8, in_channels=4, caption_channels=(16, 8))


def _official(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rank_files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("model_optim_rng.pt"))


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_split_merge_export_round_trip_is_bitwise(tmp_path, i2v):
    src = write_tiny_dit(tmp_path / "transformer", num_shards=3, num_layers=4, use_additional_conditions=i2v,
                         dtype=torch.bfloat16, **TINY)
    log = []
    split(src, tmp_path / "tp2pp2", tp_size=2, pp_layers=[1, 3], num_layers=4, log=log.append)
    assert _rank_files(tmp_path / "tp2pp2") == [f"release/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                                               for t in range(2) for p in range(2)]
    assert (tmp_path / "tp2pp2" / "latest_checkpointed_iteration.txt").read_text() == "release"
    stage0 = torch.load(tmp_path / "tp2pp2/release/mp_rank_01_000/model_optim_rng.pt", weights_only=True)["model"]
    stage1 = torch.load(tmp_path / "tp2pp2/release/mp_rank_01_001/model_optim_rng.pt", weights_only=True)["model"]
    # Stage 0: pre-process weights (with the i2v motion embedder) and block 0; stage 1: blocks 1-3 as 0-2 + head.
    assert ("adaln_single.emb.motion_score_embedder.linear_1.weight" in stage0) == i2v
    assert "pos_embed.proj.weight" in stage0 and "proj_out.weight" not in stage0
    assert {k.split(".")[1] for k in stage1 if k.startswith("transformer_blocks.")} == {"0", "1", "2"}
    assert "proj_out.weight" in stage1 and "scale_shift_table" in stage1 and "pos_embed.proj.weight" not in stage1
    # TP rank 1 holds its half of the heads of Q, K and V.
    assert stage0["transformer_blocks.0.attn1.proj_qkv.weight"].shape == (3 * 16, 32)
    merge(tmp_path / "tp2pp2", tmp_path / "tp1", tp_size=1, pp_layers=[4], num_layers=4, log=log.append)
    assert _rank_files(tmp_path / "tp1") == ["release/mp_rank_00/model_optim_rng.pt"]
    export(tmp_path / "tp1", tmp_path / "exported", log=log.append)
    want, got = _official(src), _official(tmp_path / "exported")
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert json.loads((tmp_path / "exported/config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_merge_reads_training_iterations_and_ignores_optimizer_state(tmp_path):
    src = write_tiny_dit(tmp_path / "transformer", num_layers=2, **TINY)
    split(src, tmp_path / "converted", tp_size=2, pp_layers=[2], num_layers=2, log=lambda m: None)
    # Re-label as a training checkpoint at iteration 20 with optimizer state beside the model.
    save = tmp_path / "save"
    for rank in range(2):
        payload = torch.load(tmp_path / f"converted/release/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=True)
        payload["optimizer"] = {"state": {0: torch.zeros(3)}}
        (save / f"iter_0000020/mp_rank_{rank:02d}").mkdir(parents=True)
        torch.save(payload, save / f"iter_0000020/mp_rank_{rank:02d}/model_optim_rng.pt")
    (save / "latest_checkpointed_iteration.txt").write_text("20")
    log = []
    merge(save, tmp_path / "merged", tp_size=1, pp_layers=[2], num_layers=2, log=log.append)
    assert any("notice" in m and "ignoring optimizer" in m for m in log), log
    export(tmp_path / "merged", tmp_path / "exported", log=log.append)
    want, got = _official(src), _official(tmp_path / "exported")
    assert all(torch.equal(got[k], want[k]) for k in want)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_seed_command_lines_verbatim(tmp_path):
    """The user guide's two commands, unchanged, on a tiny 48-layer model."""
    src = write_tiny_dit(tmp_path / "transformer", num_shards=6, num_layers=48, num_heads=2, head_dim=8,
                         in_channels=4, caption_channels=(8, 8))
    proc = _run("--source_path", src, "--target_path", tmp_path / "StepVideo-Converted", "--tp_size", 2,
                "--pp_size", 48, "--num_layers", 48, "--mode", "split")
    assert proc.returncode == 0, proc.stderr
    assert _rank_files(tmp_path / "StepVideo-Converted") == ["release/mp_rank_00/model_optim_rng.pt",
                                                            "release/mp_rank_01/model_optim_rng.pt"]
    proc = _run("--source_path", tmp_path / "StepVideo-Converted", "--target_path", tmp_path / "merged",
                "--tp_size", 2, "--pp_size", 48, "--num_layers", 48, "--mode", "merge")
    assert proc.returncode == 0, proc.stderr
    for rank in range(2):
        a = torch.load(tmp_path / f"StepVideo-Converted/release/mp_rank_{rank:02d}/model_optim_rng.pt",
                       weights_only=True)["model"]
        b = torch.load(tmp_path / f"merged/release/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=True)["model"]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    export(tmp_path / "merged", tmp_path / "exported", num_heads=2, log=lambda m: None)
    assert all(torch.equal(v, _official(src)[k]) for k, v in _official(tmp_path / "exported").items())


def test_errors_name_the_path_and_the_fix(tmp_path):
    src = write_tiny_dit(tmp_path / "transformer", num_layers=2, **TINY)
    with pytest.raises(ConversionError, match=r"--source_path .*nowhere does not exist"):
        split(tmp_path / "nowhere", tmp_path / "out", 1, [2], 2)
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(ConversionError, match=r"holds no \*.safetensors files .* use --source_path .*transformer"):
        split(tmp_path / "empty", tmp_path / "out", 1, [2], 2)
    with pytest.raises(ConversionError, match=r"keys missing for --num_layers 3: no transformer_blocks 2 "
                                              r"\(the checkpoint has 2 blocks\)"):
        split(src, tmp_path / "out", 1, [3], 3)
    with pytest.raises(ConversionError, match=r"unexpected keys for --num_layers 1: transformer_blocks 1 exist"):
        split(src, tmp_path / "out", 1, [1], 1)
    with pytest.raises(ConversionError, match=r"num_heads 4 is not divisible by --tp_size 3"):
        split(src, tmp_path / "out", 3, [2], 2)
    with pytest.raises(ConversionError, match=r"--pp_size 1 2 sums to 3 layers, but --num_layers is 2"):
        split(src, tmp_path / "out", 1, [1, 2], 2)
    with pytest.raises(ConversionError, match=r"--num_heads 8 does not match the checkpoint's 4 heads"):
        split(src, tmp_path / "out", 1, [2], 2, num_heads=8)
    assert not (tmp_path / "out").exists()

    odd = write_tiny_dit(tmp_path / "odd", num_shards=1, num_layers=2, **TINY)
    weights = load_file(odd / "diffusion_pytorch_model.safetensors")
    weights["foo.weight"] = torch.zeros(2)
    del weights["proj_out.bias"]
    save_file(weights, str(odd / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys \(1\): proj_out.bias.*unexpected keys "
                                                      r"\(1\): foo.weight"):
        split(odd, tmp_path / "out", 1, [2], 2)

    split(src, tmp_path / "converted", 2, [2], 2, log=lambda m: None)
    (tmp_path / "converted/latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(CheckpointError, match=r"names 100, but .*iter_0000100 does not exist"):
        merge(tmp_path / "converted", tmp_path / "out", 1, [2], 2)
    (tmp_path / "converted/latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint tracker at .*latest_checkpointed_iteration.txt"):
        merge(tmp_path / "converted", tmp_path / "out", 1, [2], 2)


def test_target_is_never_half_written(tmp_path):
    src = write_tiny_dit(tmp_path / "transformer", num_layers=2, **TINY)
    target = tmp_path / "target"
    split(src, target, 1, [2], 2, log=lambda m: None)
    before = (target / "release/mp_rank_00/model_optim_rng.pt").read_bytes()
    with pytest.raises(ConversionError, match=r"--target_path .*target exists and is not empty; pass --overwrite"):
        split(src, target, 2, [2], 2)
    # A run interrupted after writing its first rank file: the good target stays as it was,
    # and no temporary folder is left behind.
    def interrupt(message):
        if "mp_rank_01" in message:
            raise KeyboardInterrupt("simulated Ctrl-C while writing rank 1")

    with pytest.raises(KeyboardInterrupt):
        split(src, target, 2, [2], 2, overwrite=True, log=interrupt)
    assert (target / "release/mp_rank_00/model_optim_rng.pt").read_bytes() == before
    assert not (target / "release/mp_rank_01").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    split(src, target, 2, [2], 2, overwrite=True, log=lambda m: None)
    assert _rank_files(target) == ["release/mp_rank_00/model_optim_rng.pt", "release/mp_rank_01/model_optim_rng.pt"]


def test_cli_prints_one_line_errors(tmp_path):
    proc = _run("--source_path", tmp_path / "nowhere", "--target_path", tmp_path / "out", "--tp_size", 2,
                "--pp_size", 48, "--num_layers", 48, "--mode", "split")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --source_path") and "Traceback" not in proc.stderr
