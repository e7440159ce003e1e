"""Caption variety: feature extraction with `sorafeature.all_captions` encodes every caption of a row, and the feature
dataset draws one of them per epoch, as raw datasets do; the empty prompt is written for caption dropout."""

from __future__ import annotations

import json

import torch

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.data import EMPTY_PROMPT_FILE
from mindspeed_mm.config.model import MMModelConfig
from mindspeed_mm.data.datasets import FeatureDataset
from mindspeed_mm.data.manifest import read_manifest
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tools.feature_extraction.get_sora_feature import feature_name, main
from tests.helpers.pipeline_fixtures import feature_argv, write_configs


def test_every_caption_is_extracted_and_each_epoch_draws_one(tmp_path):
    paths = write_configs(tmp_path, "t2v")
    tools = json.loads(paths["tools"].read_text())
    tools["sorafeature"]["all_captions"] = True
    paths["tools"].write_text(json.dumps(tools))
    assert main(feature_argv(paths)) == 0
    out = tmp_path / "features_out"
    data = torch.load(out / "features" / feature_name("videos/b/1.mp4"))
    assert [tuple(t.shape[:1]) for t in data["prompt_ids"]] == [(2,), (2,)]  # both captions of the row
    assert data["extracted_from"]["captions"] == ["一只猫", "a cat"]
    single = torch.load(out / "features" / feature_name("videos/a/1.mp4"))
    assert single["prompt_ids"][0].shape[0] == 1

    cfg = json.loads(paths["model"].read_text())
    tokenizers = json.loads(paths["data"].read_text())["dataset_param"]["tokenizer_config"]
    model = from_dict(MMModelConfig, {**cfg, "tokenizer": tokenizers}, source="test")
    encoder = StepVideoTextEncoder.from_configs(model.text_encoder, model.tokenizer)
    wanted = {c: encoder([c])[0][0][0] for c in ("一只猫", "a cat")}
    # The empty prompt's states, encoded as the captions are, for caption dropout.
    empty = torch.load(out / EMPTY_PROMPT_FILE)
    assert torch.equal(empty["prompt_ids"][0][0], encoder([""])[0][0][0])

    dataset = FeatureDataset(read_manifest(str(out / "data.jsonl"), str(out), require_captions=False,
                                           suffixes=(".pt",), log=False), seed=1234)
    row = next(i for i, r in enumerate(dataset.rows) if r.file.endswith(feature_name("videos/b/1.mp4")))
    seen = set()
    for epoch in range(8):
        sample = dataset[(row, epoch)]
        assert sample["prompt"][0].shape == wanted["a cat"].shape
        match = [c for c, states in wanted.items() if torch.allclose(sample["prompt"][0], states, atol=1e-5)]
        assert len(match) == 1, epoch
        seen.add(match[0])
        assert torch.equal(dataset[(row, epoch)]["prompt"][0], sample["prompt"][0])  # the same draw every time
    assert seen == {"一只猫", "a cat"}  # the wording changes across epochs
