"""The DiT's fused elementwise path (RoPE in one concatenation, F.rms_norm, addcmul modulation and gates) against the
official op-by-op path, the cross-attention mask dropped when every key is valid, and right-padded key masks run as
variable-length attention."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.models.common import attention as attention_module
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.predictor.stepvideo.layers import (RMSNorm, apply_rope, apply_rope_fused, rope_cos_sin,
                                                            rope_sign)

SPLIT = [8, 4, 4]


def _dit(i2v: bool, dtype: str = "fp32") -> StepVideoDiT:
    cfg = PredictorConfig(num_layers=2, num_heads=4, head_dim=16, channel_split=SPLIT, in_channels=4,
                          out_channels=4, caption_channels=[16, 8], use_additional_conditions=i2v, dtype=dtype)
    torch.manual_seed(0)
    return StepVideoDiT.build(cfg, device="cpu")


def _batch(i2v: bool, valid=(7, 10)):
    gen = torch.Generator().manual_seed(1)
    b = len(valid)
    masks = [torch.zeros(b, 10, dtype=torch.long), torch.ones(b, 5, dtype=torch.long)]
    for i, n in enumerate(valid):
        masks[0][i, :n] = 1
    args = [torch.randn(b, 3, 4, 4, 6, generator=gen), torch.tensor([0.3, 0.9][:b]),
            [torch.randn(b, 10, 16, generator=gen), torch.randn(b, 5, 8, generator=gen)], masks]
    extra = {"image_latents": torch.randn(b, 3, 4, 4, 6, generator=gen), "motion_score": 5.0} if i2v else {}
    return args, extra


def _run(dit, args, extra, fused: bool):
    dit.fused_elementwise = fused
    dit.zero_grad(set_to_none=True)
    out = dit(*args, **extra)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in dit.named_parameters()}


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_fused_path_equals_the_official_order_in_fp32(i2v):
    dit = _dit(i2v)
    args, extra = _batch(i2v)
    out_f, grads_f = _run(dit, args, extra, True)
    out_p, grads_p = _run(dit, args, extra, False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-6)
    assert set(grads_f) == set(grads_p)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)
    assert dit.fused_elementwise is False
    dit.fused_elementwise = True
    assert all(block.fused and block.attn1.fused for block in dit.transformer_blocks)


def test_fused_rope_and_rmsnorm_match_the_official_formulas():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, 3, 16, generator=gen)
    cos, sin = rope_cos_sin(0, 24, 2, 3, 4, SPLIT, torch.float32, "cpu")
    sign = rope_sign(SPLIT, "cpu")
    torch.testing.assert_close(apply_rope_fused(x, cos, sin * sign, SPLIT), apply_rope(x, cos, sin, SPLIT),
                               rtol=1e-6, atol=1e-7)
    norm = RMSNorm(16, 1e-6, True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    fused = norm(x)
    norm.fused = False
    torch.testing.assert_close(fused, norm(x), rtol=1e-6, atol=1e-6)


def test_in_bf16_the_fused_path_is_within_bf16_rounding():
    """Both paths against the fp32 model: the fused one's error is no larger than the official order's (it rounds
    once where the op-by-op chain rounds twice)."""
    args, extra = _batch(False)
    reference = _dit(False)
    with torch.no_grad():
        want = reference(*args, **extra)
        dit = _dit(False, "bf16")
        errors = {}
        for fused in (True, False):
            dit.fused_elementwise = fused
            errors[fused] = (dit(*args, **extra).float() - want).abs().mean().item()
    assert errors[True] <= 1.25 * errors[False], errors
    assert errors[True] < 0.05 * want.abs().mean().item(), errors


def test_cross_attention_mask_is_dropped_only_when_every_key_is_valid():
    dit = _dit(False).eval()
    text = torch.randn(2, 15, 64)
    full = torch.ones(2, 10, dtype=torch.long)
    cropped, mask = dit._crop_text(text, full, 5)
    assert mask is None and cropped.shape[1] == 15
    partial = full.clone()
    partial[0, 7:] = 0
    cropped, mask = dit._crop_text(text, partial, 5)
    assert mask is not None and mask.shape == (2, 15) and not mask[0, 12:].any()
    # Without the mask the output is what an all-true mask gives.
    args, extra = _batch(False, valid=(10, 10))
    with torch.no_grad():
        dropped = dit(*args, **extra)
        dit._crop_text = lambda text, llm_mask, clip_len: (text, torch.ones(text.shape[:2], dtype=torch.bool))
        kept = dit(*args, **extra)
    torch.testing.assert_close(dropped, kept, rtol=1e-5, atol=1e-6)


def _record_masks(monkeypatch):
    """The masks (and key lengths) the sdpa backend is called with."""
    calls, sdpa = [], attention_module.sdpa_attention

    def spy(q, k, v, mask=None, scale=None):
        calls.append((None if mask is None else tuple(mask.shape), k.shape[0], k.shape[1]))
        return sdpa(q, k, v, mask, scale)

    monkeypatch.setitem(attention_module._IMPLS, "sdpa", spy)
    return calls


@pytest.mark.parametrize("lengths,expected", [
    ((7, 12, 3), [(None, 1, 7), (None, 1, 12), (None, 1, 3)]),  # ragged: one call per sample, keys cut
    ((9, 9, 9), [(None, 3, 9)]),  # one length (the CP padding): one call, keys cut
    (None, [((3, 12), 3, 12)]),  # not right padding: the masked call
], ids=["ragged", "uniform", "holes"])
def test_key_padding_masks_run_as_variable_length_attention(monkeypatch, lengths, expected):
    """A right-padded key mask runs without a mask on each sample's keys; output and q/k/v gradients equal the
    masked call's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, s, 4, 16, generator=gen, requires_grad=True) for s in (20, 12, 12))
    if lengths is None:
        mask = torch.rand(3, 12, generator=gen) > 0.3
        mask[:, 0] = True
    else:
        mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    weights = torch.randn(3, 20, 4, 16, generator=gen)

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, mask)
        (out * weights).sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

    want = run(attention_module.sdpa_attention)
    calls = _record_masks(monkeypatch)
    got = run(lambda *a: attention_module.attention(*a, backend="sdpa"))
    assert calls == expected
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_dit_with_ragged_text_equals_the_masked_cross_attention(monkeypatch, i2v):
    """Two prompts of different lengths (CFG's prompt and empty prompt): the DiT's output and every gradient with
    variable-length cross-attention equal the dense-mask path's."""
    dit = _dit(i2v)
    args, extra = _batch(i2v, valid=(4, 10))
    masked_run = _run_masked(monkeypatch, dit, args, extra)
    calls = _record_masks(monkeypatch)
    out, grads = _run(dit, args, extra, fused=True)
    assert calls and all(mask is None for mask, _, _ in calls)
    torch.testing.assert_close(out, masked_run[0], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_run[1][name], rtol=1e-5, atol=1e-6, msg=name)


def _run_masked(monkeypatch, dit, args, extra):
    with monkeypatch.context() as m:
        m.setattr(attention_module, "key_lengths", lambda mask: None)  # every key mask goes to the backend as is
        calls = _record_masks(m)
        result = _run(dit, args, extra, fused=True)
        assert any(mask is not None for mask, _, _ in calls)
    return result


def test_flash_attn_is_looked_up_once():
    attention_module._flash_attn_func.cache_clear()
    for _ in range(3):
        attention_module.resolve_backend("auto", torch.device("cuda"))
    info = attention_module._flash_attn_func.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_compiled_blocks_match_eager_forward_and_gradients():
    """--use-torch-compile: the inductor-compiled blocks (C++ on CPU) give the eager output and gradients; the
    module keeps its parameters and state-dict keys."""
    dit = _dit(True)
    args, extra = _batch(True)
    out_e, grads_e = _run(dit, args, extra, True)
    from torch._dynamo.utils import counters

    keys = list(dit.state_dict())
    counters.clear()
    dit.compile_blocks()
    out_c, grads_c = _run(dit, args, extra, True)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not silently run eagerly
    assert list(dit.state_dict()) == keys
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
