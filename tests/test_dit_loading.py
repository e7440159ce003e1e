"""StepVideoDiT.from_pretrained: official and Megatron layouts, and every load error's message."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindspeed_mm.checkpoint import CheckpointError, save_model_state_dict, write_tracker
from mindspeed_mm.config import ConfigError
from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.models.predictor import PretrainedLoadError, StepVideoDiT
from mindspeed_mm.checkpoint.official_layout import WeightsNotFoundError
from mindspeed_mm.tiny.dit import official_config, random_official_state_dict, write_official_dit


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(latents=torch.randn(1, 2, 8, 2, 4, generator=g), timestep=0.4,
                prompt=[torch.randn(1, 6, 32, generator=g), torch.randn(1, 3, 16, generator=g)],
                prompt_mask=[torch.tensor([[1, 1, 1, 0, 0, 0]]), torch.ones(1, 3)])


@pytest.fixture()
def official(tmp_path):
    cfg = official_config()
    sd = random_official_state_dict(cfg, seed=7)
    return tmp_path / "transformer", cfg, sd


def _write(folder, cfg, sd, shards=1):
    write_official_dit(folder, sd, cfg, num_shards=shards)
    return folder


def test_config_json_maps_to_predictor_config(official):
    folder, cfg, sd = official
    model = StepVideoDiT.from_pretrained(_write(folder, cfg, sd), dtype="fp32")
    pc = model.predictor_config
    assert (pc.num_layers, pc.num_heads, pc.head_dim, pc.in_channels, pc.out_channels) == (2, 4, 16, 8, 8)
    assert pc.caption_channels == [32, 16] and pc.channel_split == [8, 4, 4] and not pc.use_additional_conditions
    assert pc.dtype == "fp32"
    bf16 = StepVideoDiT.from_pretrained(folder)  # PredictorConfig's default dtype
    assert bf16.dtype == torch.bfloat16


def test_missing_path_and_wrong_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        StepVideoDiT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="never start from random weights silently"):
        StepVideoDiT.from_pretrained(tmp_path / "empty")
    root = tmp_path / "stepvideo-t2v"
    _write(root / "transformer", official_config(), random_official_state_dict(official_config()))
    with pytest.raises(WeightsNotFoundError, match="did you mean '.*transformer'"):
        StepVideoDiT.from_pretrained(root)


def test_official_folder_errors(official):
    folder, cfg, sd = official
    _write(folder, cfg, sd, shards=2)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"lists shard\(s\) \['diffusion_pytorch_model-00002-of-00002"):
        StepVideoDiT.from_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="neither diffusion_pytorch_model.safetensors nor"):
        StepVideoDiT.from_pretrained(folder)
    _write(folder, cfg, sd)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        StepVideoDiT.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_heads": 4}))
    with pytest.raises(ConfigError, match=r"config.json: unknown key\(s\) \['num_heads'\]"):
        StepVideoDiT.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "caption_channels": 32}))
    with pytest.raises(ConfigError, match="must be \\[step_llm width, clip width\\]"):
        StepVideoDiT.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown override\(s\) \['layers'\]"):
        StepVideoDiT.from_pretrained(folder, layers=3)


def test_missing_unexpected_and_mismatched_keys_are_listed(official):
    folder, cfg, sd = official
    broken = dict(sd)
    del broken["transformer_blocks.1.attn2.wkv.weight"]
    broken["transformer_blocks.0.attn1.extra.weight"] = torch.zeros(3)
    broken["clip_projection.weight"] = torch.zeros(64, 17)
    _write(folder, cfg, broken)
    with pytest.raises(PretrainedLoadError) as err:
        StepVideoDiT.from_pretrained(folder)
    msg = str(err.value)
    assert str(folder) in msg and "official layout" in msg
    assert "1 missing key(s): transformer_blocks.1.attn2.wkv.weight" in msg
    assert "1 unexpected key(s): transformer_blocks.0.attn1.extra.weight" in msg
    assert "clip_projection.weight: checkpoint (64, 17) vs model (64, 16)" in msg


def test_t2v_weights_with_an_i2v_config_fail(official):
    folder, cfg, sd = official
    _write(folder, cfg, sd)
    with pytest.raises(PretrainedLoadError) as err:
        StepVideoDiT.from_pretrained(folder, use_additional_conditions=True)
    msg = str(err.value)
    assert "adaln_single.emb.motion_score_embedder.linear_1.weight" in msg
    assert "pos_embed.proj.weight: checkpoint (64, 8, 1, 1) vs model (64, 16, 1, 1)" in msg
    with pytest.raises(PretrainedLoadError, match="attn1.wqkv.weight: checkpoint \\(192, 64\\) vs model \\(96, 32\\)"):
        StepVideoDiT.from_pretrained(folder, num_heads=2, head_dim=16)


def test_model_json_must_agree_with_config_json(official):
    folder, cfg, sd = official
    _write(folder, cfg, sd)
    model_json = PredictorConfig(num_layers=2, num_heads=4, head_dim=16, channel_split=[8, 4, 4], in_channels=8,
                                 out_channels=8, caption_channels=[32, 16], dtype="fp32")
    model = StepVideoDiT.from_pretrained(folder, model_json)
    assert model.predictor_config.dtype == "fp32"
    wrong = PredictorConfig(**{**model_json.__dict__, "num_layers": 48})
    with pytest.raises(ConfigError, match="num_layers: model config 48 vs config.json 2"):
        StepVideoDiT.from_pretrained(folder, wrong)


def _megatron_from(model, directory, iteration="release"):
    save_model_state_dict(directory, model.state_dict(), iteration=iteration, tp_rank=0)
    return directory


def test_megatron_layout_round_trip(official, tmp_path):
    folder, cfg, sd = official
    ref = StepVideoDiT.from_pretrained(_write(folder, cfg, sd), dtype="fp32").eval()
    ckpt = _megatron_from(ref, tmp_path / "mm")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    inferred = StepVideoDiT.from_pretrained(ckpt, dtype="fp32").eval()  # config read off the shapes
    assert inferred.predictor_config == ref.predictor_config
    explicit = StepVideoDiT.from_pretrained(ckpt, ref.predictor_config).eval()
    with torch.no_grad():
        want = ref(**_inputs())
        assert torch.equal(inferred(**_inputs()), want) and torch.equal(explicit(**_inputs()), want)
    it = _megatron_from(ref, tmp_path / "train", iteration=1200)
    assert (it / "latest_checkpointed_iteration.txt").read_text() == "1200"
    assert (it / "iter_0001200" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    StepVideoDiT.from_pretrained(it, dtype="fp32")
    with pytest.raises(PretrainedLoadError, match="16 missing key\\(s\\): transformer_blocks.2.attn1"):
        StepVideoDiT.from_pretrained(it, dtype="fp32", num_layers=3)


def test_megatron_layout_errors(official, tmp_path):
    folder, cfg, sd = official
    model = StepVideoDiT.from_pretrained(_write(folder, cfg, sd), dtype="fp32")
    ckpt = _megatron_from(model, tmp_path / "mm")
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        StepVideoDiT.from_pretrained(ckpt)
    msg = str(err.value)
    assert "latest_checkpointed_iteration.txt" in msg and "never start from random weights" in msg
    write_tracker(ckpt, 500)
    with pytest.raises(CheckpointError, match="names 500, but .*iter_0000500 does not exist"):
        StepVideoDiT.from_pretrained(ckpt)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("latest")
    with pytest.raises(CheckpointError, match="must hold 'release' or a non-negative iteration number"):
        StepVideoDiT.from_pretrained(ckpt)
    write_tracker(ckpt, "release")
    save_model_state_dict(ckpt, model.state_dict(), tp_rank=1)  # now a TP=2 checkpoint
    with pytest.raises(CheckpointError, match="tensor parallel size 2 .* uses --tensor-model-parallel-size 1"):
        StepVideoDiT.from_pretrained(ckpt)
    tp4 = tmp_path / "tp4"
    for rank in (0, 1, 3):
        save_model_state_dict(tp4, {}, tp_rank=rank)
    with pytest.raises(CheckpointError, match=r"incomplete: rank folder\(s\) \['mp_rank_02'\] are missing"):
        StepVideoDiT.from_pretrained(tp4)
    pp = tmp_path / "pp"
    for stage in (0, 1):
        save_model_state_dict(pp, {}, tp_rank=0, pp_rank=stage)
    with pytest.raises(CheckpointError, match="pipeline parallel size 2"):
        StepVideoDiT.from_pretrained(pp)
    bad = tmp_path / "bad"
    save_model_state_dict(bad, {}, tp_rank=0)
    torch.save({"model0": {}}, bad / "release" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="has no 'model' entry \\(found \\['model0'\\]\\)"):
        StepVideoDiT.from_pretrained(bad)
    empty = tmp_path / "empty_sd"
    save_model_state_dict(empty, {}, tp_rank=0)
    with pytest.raises(PretrainedLoadError, match="cannot read the DiT configuration .* Pass config="):
        StepVideoDiT.from_pretrained(empty)


def test_official_weights_in_bf16_load_into_fp32(official):
    folder, cfg, sd = official
    _write(folder, cfg, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32")
    got = model.state_dict()["clip_projection.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, sd["clip_projection.weight"].to(torch.bfloat16).float())
    on_disk = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert on_disk["clip_projection.weight"].dtype == torch.bfloat16
    save_file({"x": torch.zeros(1)}, str(folder / "stray.safetensors"))  # ignored: not a DiT weight file name
    StepVideoDiT.from_pretrained(folder, dtype="fp32")
