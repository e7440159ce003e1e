"""Caption dropout (`preprocess_parameters.cfg`): which samples are trained on the empty prompt, that it trains the
unconditional branch classifier-free guidance samples with, that resume stays bitwise, and the missing-file error."""

from __future__ import annotations

import json

import pytest
import torch

from mindspeed_mm.arguments import ArgumentError, parse_args
from mindspeed_mm.config.data import EMPTY_PROMPT_FILE
from mindspeed_mm.data.datasets import collate
from mindspeed_mm.models.diffusion import FlowMatchScheduler
from mindspeed_mm.models.diffusion_loss import DiffusionLossModel
from mindspeed_mm.training import pretrain
from mindspeed_mm.training.train import noise_generator
from tests.helpers.training_eval import feature_samples, load_dit
from tests.helpers.training_fixtures import train_argv, write_training_configs


def _set_cfg(paths: dict, p: float) -> None:
    data = json.loads(paths["data"].read_text())
    data["dataset_param"]["preprocess_parameters"] = {"cfg": p}
    paths["data"].write_text(json.dumps(data))


def _empty(paths: dict):
    payload = torch.load(paths["data"].parent / "features_data" / EMPTY_PROMPT_FILE)
    return payload["prompt_ids"], payload["prompt_mask"]


def test_dropped_rows_get_the_empty_prompt_and_one_draw_per_sample(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    batch = collate(feature_samples(paths)[:4])
    empty = _empty(paths)
    model = DiffusionLossModel(load_dit(paths["dit"]), FlowMatchScheduler(), caption_dropout=0.5, empty_prompt=empty)
    gen = torch.Generator().manual_seed(7)
    prompt, mask = model.drop_captions(list(batch["prompt"]), list(batch["prompt_mask"]), gen)
    replay = torch.Generator().manual_seed(7)
    dropped = torch.rand(4, generator=replay) < 0.5
    assert 0 < int(dropped.sum()) < 4  # this seed drops some rows and keeps others
    assert torch.equal(gen.get_state(), replay.get_state())  # exactly one uniform per sample was drawn
    for i in range(4):
        for k in range(2):
            want = empty[0][k][0] if dropped[i] else batch["prompt"][k][i]
            want_mask = empty[1][k][0] if dropped[i] else batch["prompt_mask"][k][i]
            assert torch.equal(prompt[k][i], want.to(prompt[k].dtype)), (i, k)
            assert torch.equal(mask[k][i], want_mask.to(mask[k].dtype)), (i, k)
    # p = 0 draws nothing: runs without dropout are what they were before it existed
    off = DiffusionLossModel(load_dit(paths["dit"]), FlowMatchScheduler())
    gen = torch.Generator().manual_seed(7)
    off.drop_captions(list(batch["prompt"]), list(batch["prompt_mask"]), gen)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(7).get_state())


def test_the_empty_prompt_is_encoded_when_the_text_encoder_runs_in_training(tmp_path):
    from mindspeed_mm.config import from_dict
    from mindspeed_mm.config.model import MMModelConfig
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
    from mindspeed_mm.tiny.download import write_tiny_download

    cfg = from_dict(MMModelConfig, write_tiny_download(tmp_path / "weights"), source="tiny")
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    from mindspeed_mm.models.predictor import StepVideoDiT

    dit = StepVideoDiT.from_pretrained(cfg.predictor.from_pretrained, cfg.predictor)
    model = DiffusionLossModel(dit, FlowMatchScheduler(), text_encoder=encoder, caption_dropout=0.1)
    states, masks = model.empty_prompt_states()
    want_states, want_masks = encoder([""])
    assert all(torch.equal(a, b) for a, b in zip(states, want_states))
    assert all(torch.equal(a, b) for a, b in zip(masks, want_masks))


def test_features_without_the_empty_prompt_are_refused_before_anything_is_built(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    (paths["data"].parent / "features_data" / EMPTY_PROMPT_FILE).unlink()
    with pytest.raises(ArgumentError, match="empty_prompt.pt is missing: caption dropout"):
        parse_args(train_argv(paths, tmp_path / "s", iters=1), entry="pretrain")
    _set_cfg(paths, 0.0)  # without caption dropout the file is not needed
    parse_args(train_argv(paths, tmp_path / "s", iters=1), entry="pretrain")


ITERS = 200


def _empty_prompt_loss(dit, paths, samples) -> float:
    """Mean flow-matching loss of `samples` with the empty prompt's states in place of their captions, at t = 0.5
    (half noise), where the prediction rests on the text as much as on x_t."""
    model = DiffusionLossModel(dit, FlowMatchScheduler())
    empty, empty_mask = _empty(paths)
    losses = []
    with torch.no_grad():
        for k, sample in enumerate(samples):
            batch = collate([sample])
            batch["prompt"], batch["prompt_mask"] = [e.clone() for e in empty], [m.clone() for m in empty_mask]
            losses.append(model(batch, noise_generator(99, 0, k), t=torch.full((1,), 0.5)).mean())
    return torch.stack(losses).mean().item()


def _two_class_features(paths: dict) -> None:
    """Rewrite the feature files so that the caption decides the video: class c's samples share caption states S_c
    and their latents are M_c plus a little noise (M_1 = -M_0). The empty prompt is neither caption, and the best
    unconditional prediction is the mixture of the two classes."""
    folder = paths["data"].parent / "features_data"
    gen = torch.Generator().manual_seed(3)
    pattern = torch.randn(2, 4, 2, 2, generator=gen)
    captions = [[torch.randn(1, 10, 16, generator=gen), torch.randn(1, 5, 8, generator=gen)] for _ in range(2)]
    for i in range(8):
        path = folder / "features" / f"s{i}.pt"
        data = torch.load(path)
        c = i % 2
        data["video"] = (1 if c == 0 else -1) * pattern + 0.1 * torch.randn(pattern.shape, generator=gen)
        data["prompt_ids"] = [t.clone() for t in captions[c]]
        data["prompt_mask"] = [torch.ones(1, 10, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)]
        torch.save(data, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    runs = {}
    for p in (0.0, 0.5):
        paths = write_training_configs(root / f"w{p}")
        _two_class_features(paths)
        _set_cfg(paths, p)
        # Unshifted noise levels: this test isolates caption dropout (train_shift has its own benchmark).
        model = json.loads(paths["model"].read_text())
        model["diffusion"]["train_shift"] = None
        paths["model"].write_text(json.dumps(model))
        argv = train_argv(paths, root / f"save{p}", iters=ITERS, gbs=4,
                          extra=["--save-interval", str(ITERS), "--log-interval", str(ITERS)])
        argv[argv.index("--lr") + 1] = argv[argv.index("--min-lr") + 1] = "3e-3"
        pretrain(argv)
        runs[p] = (paths, root / f"save{p}")
    return runs


def test_caption_dropout_trains_the_unconditional_branch(trained):
    """On data whose caption decides the video, the loss on empty prompts after training: with dropout it falls far
    below what training without dropout leaves (there the empty prompt is an unseen caption)."""
    results = {}
    for p, (paths, save) in trained.items():
        samples = feature_samples(paths)
        results[p] = (_empty_prompt_loss(load_dit(paths["dit"]), paths, samples),
                      _empty_prompt_loss(load_dit(save), paths, samples))
    (before, with_dropout), (_, without) = results[0.5], results[0.0]
    assert with_dropout < 0.5 * before, results
    assert with_dropout < 0.8 * without, results


def test_resume_is_bitwise_with_caption_dropout(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    _set_cfg(paths, 0.5)
    pretrain(train_argv(paths, tmp_path / "full", iters=4))
    pretrain(train_argv(paths, tmp_path / "half", iters=2))
    pretrain(train_argv(paths, tmp_path / "half", iters=4, extra=["--load", str(tmp_path / "half")]))
    metrics = {}
    for name in ("full", "half"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        metrics[name] = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in rows}
    assert all(metrics["full"][it] == metrics["half"][it] for it in (3, 4)), metrics
