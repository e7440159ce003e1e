"""Step-LLM (golden), StepChat and BERT tokenizers, HunyuanCLIP, and the text-encoding API."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindspeed_mm.config.model import TextEncoderConfig, TokenizerConfig
from mindspeed_mm.models import get_model_class
from mindspeed_mm.checkpoint.safetensors_io import CheckpointMismatchError
from mindspeed_mm.models.text_encoder import (
    BertPromptTokenizer,
    HunyuanClipEncoder,
    StepChatTokenizer,
    StepLLMEncoder,
    StepVideoTextEncoder,
)
from mindspeed_mm.checkpoint.official_layout import WeightsNotFoundError
from mindspeed_mm.tiny.text_encoders import (
    CORPUS,
    train_stepchat_tokenizer,
    write_tiny_hunyuan_clip,
    write_tiny_step_llm,
)

GOLDEN = Path(__file__).parent / "golden" / "stepvideo"
REPO = Path(__file__).resolve().parents[1]


def _write_golden_step_llm(folder: Path, shards: int = 3) -> dict:
    """The golden weights as an official step_llm/ folder: config.json + named shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    case = json.loads((GOLDEN / "stepllm.json").read_text())
    (folder / "config.json").write_text(json.dumps(case["config"]))
    weights = load_file(GOLDEN / "stepllm.weights.safetensors")
    keys = sorted(weights)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weights


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_tiny_step_llm(str(root / "step_llm"))
    write_tiny_hunyuan_clip(str(root / "hunyuan_clip"))
    return root


# ---- Step-LLM ---------------------------------------------------------------------------


def test_step_llm_matches_golden_from_official_shards(tmp_path):
    _write_golden_step_llm(tmp_path / "step_llm")
    io_ = load_file(GOLDEN / "stepllm.io.safetensors")
    model = StepLLMEncoder.from_pretrained(str(tmp_path / "step_llm"), dtype=torch.float32)
    out = model(io_["input.input_ids"], io_["input.attention_mask"])
    torch.testing.assert_close(out, io_["output.last_hidden_state"], rtol=1e-4, atol=1e-4)
    # The padding mask is ignored (attention is causal), as in the released model.
    torch.testing.assert_close(model(io_["input.input_ids"], None), out, rtol=0, atol=0)
    assert get_model_class("StepLLmModel") is StepLLMEncoder


def test_step_llm_bf16_is_close_to_fp32(tmp_path):
    _write_golden_step_llm(tmp_path / "step_llm", shards=1)
    io_ = load_file(GOLDEN / "stepllm.io.safetensors")
    fp32 = StepLLMEncoder.from_pretrained(str(tmp_path / "step_llm"), dtype=torch.float32)
    bf16 = StepLLMEncoder.from_pretrained(str(tmp_path / "step_llm"), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    out = bf16(io_["input.input_ids"])
    assert out.dtype == torch.bfloat16
    ref = fp32(io_["input.input_ids"])
    # bf16 keeps ~3 significant digits; two layers of |x| ~ 4 stay within 0.15.
    assert (out.float() - ref).abs().max() < 0.15


def test_step_llm_load_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)'.*nowhere' \(from_pretrained\) does not exist.*step_llm"):
        StepLLMEncoder.from_pretrained(str(tmp_path / "nowhere"))
    folder = tmp_path / "step_llm"
    folder.mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"has no config.json"):
        StepLLMEncoder.from_pretrained(str(folder))

    weights = _write_golden_step_llm(folder, shards=2)
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) that are not in .*model-00002-of-00002"):
        StepLLMEncoder.from_pretrained(str(folder))

    for f in folder.glob("model*"):
        f.unlink()
    partial = dict(weights)
    partial.pop("transformer.layers.1.feed_forward.w2.weight")
    partial["transformer.layers.2.attention.wo.weight"] = torch.zeros(32, 32)
    save_file(partial, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        StepLLMEncoder.from_pretrained(str(folder))
    msg = str(err.value)
    assert "missing keys (1): transformer.layers.1.feed_forward.w2.weight" in msg
    assert "unexpected keys (1): transformer.layers.2.attention.wo.weight" in msg

    config = json.loads((folder / "config.json").read_text())
    config["ffn_hidden_size"] = 300  # rounds to 512, not the checkpoint's 256
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches .*w1.weight: checkpoint \(512, 32\) vs "
                                                      r"model \(1024, 32\)"):
        StepLLMEncoder.from_pretrained(str(folder))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_step_llm_loading_holds_one_copy(tmp_path):
    """Peak RSS while loading stays near one copy of the weights (shard by shard, no second copy)."""
    folder = tmp_path / "step_llm"
    # ~200 MB in bf16: 8 layers of width 1024.
    write_tiny_step_llm(str(folder), hidden_size=1024, num_attention_heads=8, num_attention_groups=2,
                        num_layers=8, ffn_hidden_size=2816, num_shards=4)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import torch
        from mindspeed_mm.models.text_encoder import StepLLMEncoder

        def high_water_kb():
            # VmHWM belongs to this process image; ru_maxrss would include the parent's, inherited at exec.
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

        base = high_water_kb()
        model = StepLLMEncoder.from_pretrained({str(folder)!r}, dtype=torch.bfloat16)
        # Touch every weight so that memory-mapped pages count as resident too.
        total = sum(float(p.sum()) for p in model.parameters())
        peak = high_water_kb()
        print((peak - base) * 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.strip().splitlines()[-1])
    assert 0.8 * size < growth < 1.6 * size, f"RSS grew {growth / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"


# ---- tokenizers -------------------------------------------------------------------------


def test_stepchat_ids_mask_truncation_and_empty(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the reference writes ./token.txt; we must not write anything
    model_file = str(tiny_weights / "step_llm" / "step1_chat_tokenizer.model")
    tok = StepChatTokenizer(model_file, model_max_length=320)
    for text in ("A cat walks along a sunny windowsill.", "一只猫沿着窗台走动。", "Mixed 中英 text"):
        ids, mask = tok([text])
        pieces = tok.sp.encode_as_ids(text)
        assert pieces, text
        want = [1] + pieces + [2] + [2] * (320 - len(pieces) - 2)
        assert ids.shape == (1, 320) and ids.dtype == torch.long
        assert ids[0].tolist() == want
        assert mask[0].tolist() == [1] * (len(pieces) + 2) + [0] * (320 - len(pieces) - 2)
    # Fixed ids, not the SentencePiece file's: BOS=1, EOS=2, PAD=2.
    ids, mask = tok(["", "A cat"])
    assert ids[0, :3].tolist() == [1, 2, 2] and mask[0].sum() == 2 and mask[0, :2].tolist() == [1, 1]
    long_text = " ".join(CORPUS) * 20
    ids, mask = tok([long_text])
    pieces = tok.sp.encode_as_ids(long_text)
    assert len(pieces) > 318
    assert ids[0].tolist() == [1] + pieces[:318] + [2] and mask[0].sum() == 320
    short = StepChatTokenizer(model_file, model_max_length=8)
    ids, mask = short(["A cat walks along a sunny windowsill"])
    assert ids.shape == (1, 8) and ids[0, 0] == 1 and ids[0, -1] == 2 and mask.sum() == 8
    assert list(tmp_path.iterdir()) == [], "the tokenizer wrote files into the working directory"


def test_stepchat_special_token_check(tmp_path):
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=640,
                                   character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    plain = tmp_path / "plain.model"
    plain.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"is not a StepChat tokenizer: <\|BOT\|> is missing"):
        StepChatTokenizer(str(plain))
    # Present, but as a user-defined (not control) token.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=640, character_coverage=1.0,
        byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
        control_symbols=["<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>"],
        user_defined_symbols=["<|THINK_END|>", "<|MASK_1e69f|>", "<|UNMASK_1e69f|>"])
    wrong = tmp_path / "wrong.model"
    wrong.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"<\|THINK_END\|> is not a control token"):
        StepChatTokenizer(str(wrong))
    good = train_stepchat_tokenizer(str(tmp_path / "good.model"))
    assert StepChatTokenizer(good).vocab_size > 256
    with pytest.raises(WeightsNotFoundError, match=r"'.*missing.model' \(from_pretrained\) does not exist"):
        StepChatTokenizer(str(tmp_path / "missing.model"))


def test_bert_path_equals_transformers(tiny_weights):
    from transformers import BertModel, BertTokenizer

    prompts = ["A cat walks along a sunny windowsill.", "一只猫沿着阳光明媚的窗台走动。", ""]
    ours_tok = BertPromptTokenizer(str(tiny_weights / "hunyuan_clip" / "tokenizer"))
    ids, mask = ours_tok(prompts)
    ref_tok = BertTokenizer.from_pretrained(str(tiny_weights / "hunyuan_clip" / "tokenizer"))
    ref = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids.shape == (3, 77) and torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    assert mask[2].sum() == 2  # [CLS] [SEP]
    ours = HunyuanClipEncoder.from_pretrained(str(tiny_weights / "hunyuan_clip" / "clip_text_encoder"))
    bert = BertModel.from_pretrained(str(tiny_weights / "hunyuan_clip" / "clip_text_encoder")).eval()
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert get_model_class("BertModel") is HunyuanClipEncoder


def test_bert_missing_weights_is_an_error(tiny_weights, tmp_path):
    src = tiny_weights / "hunyuan_clip" / "clip_text_encoder"
    dst = tmp_path / "clip_text_encoder"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin")
    state.pop("encoder.layer.1.output.dense.weight")
    torch.save(state, dst / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"does not match its config.json: missing keys "
                                         r"\['encoder.layer.1.output.dense.weight'\]"):
        HunyuanClipEncoder.from_pretrained(str(dst))


# ---- the text-encoding API --------------------------------------------------------------


def _configs(root: Path):
    encoders = [TextEncoderConfig("StepLLmModel", str(root / "step_llm"), dtype="bf16"),
                TextEncoderConfig("BertModel", str(root / "hunyuan_clip" / "clip_text_encoder"), dtype="float32")]
    sp_model = str(root / "step_llm" / "step1_chat_tokenizer.model")
    tokenizers = [TokenizerConfig("stepchat", sp_model, model_max_length=320),
                  TokenizerConfig("BertTokenizer", str(root / "hunyuan_clip" / "tokenizer"), model_max_length=77)]
    return encoders, tokenizers


def test_text_encoding_api_shapes_masks_and_batching(tiny_weights):
    encoders, tokenizers = _configs(tiny_weights)
    encoder = StepVideoTextEncoder.from_configs(encoders, tokenizers, unload_after_use=True)
    prompts = ["a cat", "一只猫在窗台上慢慢走动，向外张望，阳光明媚。", "A red car drives through a rainy city street."]
    prompt, prompt_mask = encoder(prompts)
    llm_width = encoder.llm.config.hidden_size
    assert [tuple(p.shape) for p in prompt] == [(3, 320, llm_width), (3, 77, encoder.clip.hidden_size)]
    assert [tuple(m.shape) for m in prompt_mask] == [(3, 320), (3, 77)]
    llm_ids, llm_mask = encoder.llm_tokenizer(prompts)
    assert torch.equal(prompt_mask[0], llm_mask) and prompt_mask[0].dtype == torch.long
    lengths = prompt_mask[0].sum(1).tolist()
    assert len(set(lengths)) == 3, lengths  # mixed lengths really are mixed
    # Each row equals encoding that prompt alone, and chunked batches equal one batch.
    alone, _ = encoder(prompts[1:2])
    torch.testing.assert_close(prompt[0][1:2], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(prompt[1][1:2], alone[1], rtol=1e-5, atol=1e-5)
    chunked, _ = encoder(prompts, batch_size=2)
    torch.testing.assert_close(chunked[0], prompt[0], rtol=0, atol=0)
    assert next(encoder.llm.parameters()).device.type == "cpu"


def test_text_encoding_with_step_llm_layers_offloaded(tiny_weights, tmp_path):
    """text_encoder_layerwise_offload: the same states, each Step-LLM layer resident only while it (or its
    predecessor) runs, and unload_after_use still drops every device copy (models/common/offload.py)."""
    write_tiny_step_llm(str(tmp_path / "step_llm"), num_layers=4)  # four layers: two resident is not all
    (tmp_path / "hunyuan_clip").symlink_to(tiny_weights / "hunyuan_clip")
    encoders, tokenizers = _configs(tmp_path)
    prompts = ["a cat", "一只猫在窗台上慢慢走动，向外张望，阳光明媚。"]
    plain, plain_mask = StepVideoTextEncoder.from_configs(encoders, tokenizers)(prompts)
    encoder = StepVideoTextEncoder.from_configs(encoders, tokenizers, device="cpu", unload_after_use=True,
                                                layerwise_offload=True)
    encoder(prompts[:1])  # the offload is set up at the first call, for the device it runs on
    layers = encoder.llm.transformer.layers
    seen = []
    for i, layer in enumerate(layers):  # after the offload's hooks: sees the state the layer runs in
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(set(encoder.llm_offload.resident)))
    prompt, mask = encoder(prompts)
    for got, want in zip(prompt + mask, plain + plain_mask):
        assert torch.equal(got, want)
    assert len(layers) == 4 and seen == [{i, (i + 1) % 4} for i in range(4)]
    assert encoder.llm_offload.resident == set()  # unload_after_use released the prefetched first layer
    again, _ = encoder(prompts[:1])
    assert torch.equal(again[0], plain[0][:1])


def test_step_llm_loads_onto_its_device_unless_its_layers_are_offloaded(tiny_weights, monkeypatch):
    """from_configs(device=...) loads Step-LLM shard by shard onto the device (no whole host copy); with
    layerwise_offload it loads on the host, where its layers stay."""
    from mindspeed_mm.models.text_encoder.step_llm import StepLLMEncoder

    encoders, tokenizers = _configs(tiny_weights)
    seen, load = [], StepLLMEncoder.from_pretrained.__func__
    monkeypatch.setattr(StepLLMEncoder, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: seen.append(kw.get("device")) or load(cls, *a, **kw)))
    StepVideoTextEncoder.from_configs(encoders, tokenizers, device="cpu")
    StepVideoTextEncoder.from_configs(encoders, tokenizers, device="cpu", layerwise_offload=True)
    StepVideoTextEncoder.from_configs(encoders, tokenizers)
    assert seen == ["cpu", None, None]


def test_text_encoding_config_errors(tiny_weights, tmp_path):
    encoders, tokenizers = _configs(tiny_weights)
    with pytest.raises(ValueError, match=r"text_encoder list must hold two entries with model_id 'StepLLmModel' "
                                         r"then 'BertModel'"):
        StepVideoTextEncoder.from_configs(encoders[::-1], tokenizers)
    with pytest.raises(ValueError, match=r"tokenizer list must hold two entries"):
        StepVideoTextEncoder.from_configs(encoders, tokenizers[:1])
    encoders[0].from_pretrained = str(tmp_path / "weights" / "step_llm")
    with pytest.raises(WeightsNotFoundError) as err:
        StepVideoTextEncoder.from_configs(encoders, tokenizers)
    msg = str(err.value)
    assert "Step-LLM text encoder" in msg and "Expected layout of the official download" in msg
    assert "step1_chat_tokenizer.model" in msg and "clip_text_encoder" in msg


def test_hunyuan_clip_path_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)HunyuanCLIP text encoder .*'.*clip_text_encoder' "
                                                   r"\(from_pretrained\) does not exist.*Expected layout"):
        HunyuanClipEncoder.from_pretrained(str(tmp_path / "clip_text_encoder"))
    (tmp_path / "clip_text_encoder").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"has no config.json"):
        HunyuanClipEncoder.from_pretrained(str(tmp_path / "clip_text_encoder"))
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*tokenizer' has no vocab.txt; point from_pretrained at "
                                                r"hunyuan_clip/tokenizer"):
        BertPromptTokenizer(str(tmp_path / "tokenizer"))
