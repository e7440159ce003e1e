"""StepVideoDiT in one process: layout adapter, precision, recompute, inputs and the registry."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.models import get_model_class
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.checkpoint import stepvideo_adapter as adapter
from mindspeed_mm.checkpoint.stepvideo_layout import plan_for_parameter
from mindspeed_mm.models.predictor.stepvideo.parallelize import check_heads_divisible
from mindspeed_mm.runtime import ParallelConfigError
from mindspeed_mm.tiny.dit import official_config, random_official_state_dict, write_tiny_dit

B, F, C, H, W = 2, 2, 8, 4, 6


def _inputs(i2v: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    args = dict(
        latents=torch.randn(B, F, C, H, W, generator=g),
        timestep=torch.tensor([0.25, 0.8]),
        prompt=[torch.randn(B, 10, 32, generator=g), torch.randn(B, 5, 16, generator=g)],
        prompt_mask=[torch.tensor([[1] * 4 + [0] * 6, [1] * 7 + [0] * 3]), torch.ones(B, 5)],
    )
    if i2v:
        cond = torch.zeros(B, F, C, H, W)
        cond[:, 0] = torch.randn(B, C, H, W, generator=g)
        args.update(image_latents=cond, motion_score=torch.tensor([5.0, 2.0]))
    return args


@pytest.fixture(scope="module", params=[False, True], ids=["t2v", "i2v"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "transformer"
    write_tiny_dit(folder, use_additional_conditions=request.param, num_shards=2, seed=3)
    return request.param, folder


def test_registered_under_model_id():
    assert get_model_class("stepvideodit") is StepVideoDiT


def test_internal_names_follow_mindspeed_mm(tiny):
    i2v, folder = tiny
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32")
    keys = set(model.state_dict())
    for k in ("transformer_blocks.0.attn1.proj_qkv.weight", "transformer_blocks.0.attn1.proj_out.weight",
              "transformer_blocks.1.attn2.proj_q.weight", "transformer_blocks.1.attn2.proj_kv.weight",
              "transformer_blocks.1.attn2.proj_out.weight", "transformer_blocks.0.ff.net.0.proj.weight",
              "transformer_blocks.0.ff.net.2.weight", "adaln_single.linear.weight", "pos_embed.proj.weight",
              "clip_projection.weight", "caption_projection.linear_1.weight", "scale_shift_table", "proj_out.bias"):
        assert k in keys, k
    assert not any("_extra_state" in k or ".wqkv" in k or ".wo." in k for k in keys)
    assert ("adaln_single.emb.motion_score_embedder.linear_1.weight" in keys) == i2v
    shapes = adapter.official_param_shapes(official_config(use_additional_conditions=i2v))
    assert {adapter.official_key_to_ours(k) for k in shapes} == keys


def test_per_head_permutation_and_tp_shards():
    heads, hd = 4, 2
    # Label every row of an official per-head fused QKV weight by (head, part, row).
    rows = [(h, part, r) for h in range(heads) for part in range(3) for r in range(hd)]
    official = torch.tensor([[h * 100 + part * 10 + r] for h, part, r in rows], dtype=torch.float32)
    ours = adapter.per_head_to_grouped(official, 3, hd)
    want = [p * 10 + h * 100 + r for p in range(3) for h in range(heads) for r in range(hd)]
    assert ours[:, 0].tolist() == want  # [Q_all; K_all; V_all], heads in order inside each
    assert torch.equal(adapter.grouped_to_per_head(ours, 3, hd), official)
    key = "transformer_blocks.0.attn1.proj_qkv.weight"
    rank1 = adapter.shard_tensor(key, ours, 1, 2)
    # TP rank 1 of 2 holds heads 2,3 of Q, then of K, then of V.
    assert rank1[:, 0].tolist() == [p * 10 + h * 100 + r for p in range(3) for h in (2, 3) for r in range(hd)]
    for tp in (1, 2, 4):
        shards = [adapter.shard_tensor(key, ours, r, tp) for r in range(tp)]
        assert torch.equal(adapter.merge_tensor(key, shards), ours)


def test_state_dict_round_trips_and_plan():
    cfg = official_config(num_layers=1, use_additional_conditions=True)
    sd = random_official_state_dict(cfg, seed=1)
    ours = adapter.official_to_ours(sd, head_dim=cfg["attention_head_dim"])
    back = adapter.ours_to_official(ours, head_dim=cfg["attention_head_dim"])
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    kv = "transformer_blocks.0.attn2."
    assert not torch.equal(ours[kv + "proj_kv.weight"], sd[kv + "wkv.weight"])
    for tp in (2, 4):
        merged = adapter.merge_state_dicts(adapter.split_state_dict(ours, tp))
        assert all(torch.equal(merged[k], ours[k]) for k in ours)
    plan, leaf = plan_for_parameter("transformer_blocks.3.ff.net.2.weight")
    assert (plan.style, leaf) == ("row", "weight")
    plan, _ = plan_for_parameter("adaln_single.linear.bias")
    assert plan.style == "column" and plan.gather_output
    assert plan_for_parameter("transformer_blocks.0.norm1.weight")[0] is None
    assert adapter.shard_tensor("adaln_single.linear.bias", torch.arange(8.0), 1, 2).tolist() == [4, 5, 6, 7]


def test_single_file_and_sharded_folders_load_the_same(tiny, tmp_path):
    i2v, folder = tiny
    single = write_tiny_dit(tmp_path / "single", use_additional_conditions=i2v, num_shards=1, seed=3)
    a = StepVideoDiT.from_pretrained(folder, dtype="fp32").state_dict()
    b = StepVideoDiT.from_pretrained(single, dtype="fp32").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_forward_close_to_fp32(tiny):
    """bf16 parameters and activations vs fp32: relative L2 error under 3e-2 and max abs error
    under 5% of the output's max magnitude (measured: about 1e-2 and 1%)."""
    i2v, folder = tiny
    inputs = _inputs(i2v)
    with torch.no_grad():
        ref = StepVideoDiT.from_pretrained(folder, dtype="fp32").eval()(**inputs)
        model = StepVideoDiT.from_pretrained(folder, dtype="bf16").eval()
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    out = out.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_qk_norm_computes_in_fp32():
    from mindspeed_mm.models.predictor.stepvideo.layers import RMSNorm

    norm = RMSNorm(16, 1e-6, True, dtype=torch.bfloat16)
    x = (torch.randn(3, 16) * 1e3).to(torch.bfloat16)
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)


@pytest.mark.parametrize("method,num_layers", [("block", 1), ("block", 2), ("uniform", 1), ("uniform", 2)])
def test_recompute_matches_plain(tiny, method, num_layers):
    i2v, folder = tiny
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32")
    inputs = _inputs(i2v)
    upstream = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(5))

    def run():
        model.zero_grad()
        (model(**inputs) * upstream).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run()
    model.configure_recompute("full", method, num_layers)
    got = run()
    for name, g in ref.items():
        assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-5), name


def test_recompute_flag_errors(tiny):
    model = StepVideoDiT.from_pretrained(tiny[1], dtype="fp32")
    with pytest.raises(ValueError, match="--recompute-granularity selective is not supported"):
        model.configure_recompute("selective")
    with pytest.raises(ValueError, match="needs --recompute-method block or uniform"):
        model.configure_recompute("full", None, 1)
    with pytest.raises(ValueError, match="--recompute-num-layers 0 must be at least 1"):
        model.configure_recompute("full", "block", 0)
    # The seed's launchers pass 48 with 24-layer configs: every block is recomputed.
    model.configure_recompute("full", "block", 3)
    assert model.recompute_num_layers == 2


def test_parallel_constraint_messages():
    with pytest.raises(ParallelConfigError) as err:
        check_heads_divisible(6, 2, 2)
    msg = str(err.value)
    assert "num_heads 6" in msg and "--tensor-model-parallel-size 2" in msg and "Ulysses degree 2" in msg
    assert "model JSON" in msg and "megatron_cp_algo" in msg
    check_heads_divisible(48, 8, 2)
    check_heads_divisible(48, 8, 6)  # TP8 x CP12 as Ulysses 6 x ring 2


def test_forward_input_errors(tiny):
    i2v, folder = tiny
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32")
    inputs = _inputs(i2v)
    if i2v:
        bad = {k: v for k, v in inputs.items() if k != "image_latents"}
        with pytest.raises(ValueError, match="pass image_latents"):
            model(**bad)
    else:
        with pytest.raises(ValueError, match="given to a t2v DiT"):
            model(**inputs, image_latents=inputs["latents"])
    with pytest.raises(ValueError, match="prefix of ones"):
        model(**{**inputs, "prompt_mask": [torch.tensor([[0] * 4 + [1] * 6] * 2), torch.ones(B, 5)]})
    with pytest.raises(ValueError, match="do not pass 0..999 timesteps"):
        model(**{**inputs, "timestep": torch.tensor([250.0, 999.0])})
    with pytest.raises(ValueError, match="in_channels is 8"):
        model(**{**inputs, "latents": torch.randn(B, F, 4, H, W)})


def test_timestep_scalar_and_ms_style_prompt_shapes(tiny):
    i2v, folder = tiny
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32").eval()
    inputs = _inputs(i2v)
    with torch.no_grad():
        ref = model(**{**inputs, "timestep": torch.tensor([0.5, 0.5])})
        scalar = model(**{**inputs, "timestep": 0.5})
        ms_style = model(**{**inputs, "timestep": 0.5, "prompt": [p[:, None] for p in inputs["prompt"]],
                            "prompt_mask": [m[:, None] for m in inputs["prompt_mask"]]})
    assert torch.equal(ref, scalar) and torch.equal(ref, ms_style)
    assert ref.shape == (B, F, C, H, W)


def test_constructor_initialises_every_parameter():
    cfg = PredictorConfig(num_layers=1, num_heads=2, head_dim=16, channel_split=[8, 4, 4], in_channels=4,
                          out_channels=4, caption_channels=[8, 8], dtype="fp32")
    torch.manual_seed(0)
    model = StepVideoDiT(cfg)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert model.transformer_blocks[0].attn1.proj_qkv.weight.std() > 0
