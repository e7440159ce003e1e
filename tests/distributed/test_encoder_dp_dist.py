"""`enable_encoder_dp` on 2 gloo ranks with TP=2 (both ranks hold the same micro-batches): raw videos are encoded
once per group and training gives what encoding on every rank gives.

(a) The model: one iteration of 2 micro-batches (t2v, i2v, i2v DPO) through `encode_iteration`, then `forward` with
    the same generators: the per-micro-batch losses and every DiT gradient equal, bit for bit, those of encoding in
    `forward` on every rank; each rank ran the VAE encoder and the text encoders on its micro-batch only.
(b) The trainer: 2 steps of `pretrain` with and without the key log the same losses and grad norms, and with it each
    rank encodes half the micro-batches.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

_setups = {}


def _shared_setup(task: str) -> dict:
    """The tiny raw-video setup, written once by rank 0 into a folder every rank reads."""
    from tests.helpers.encoder_dp_fixtures import write_raw_setup

    if task not in _setups:
        box = [write_raw_setup(Path(tempfile.mkdtemp(prefix="mm_encdp_")), task) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        _setups[task] = box[0]
    return _setups[task]


@contextmanager
def _counting():
    """Counts, on this rank, the samples the VAE encoder and the Step-LLM encoder are run on (any instance)."""
    from mindspeed_mm.models.ae.networks import VideoEncoder
    from mindspeed_mm.models.text_encoder.step_llm import StepLLMEncoder

    counts = {"vae": 0, "llm": 0}
    originals = {VideoEncoder: VideoEncoder.forward, StepLLMEncoder: StepLLMEncoder.forward}

    def wrap(cls, name):
        def forward(self, x, *args, **kwargs):
            counts[name] += x.shape[0]
            return originals[cls](self, x, *args, **kwargs)
        return forward

    VideoEncoder.forward, StepLLMEncoder.forward = wrap(VideoEncoder, "vae"), wrap(StepLLMEncoder, "llm")
    try:
        yield counts
    finally:
        VideoEncoder.forward, StepLLMEncoder.forward = originals[VideoEncoder], originals[StepLLMEncoder]


def _check_model(task: str, dpo: bool = False):
    from megatron.core import parallel_state as ps

    from mindspeed_mm.runtime import initialize_model_parallel
    from tests.helpers.encoder_dp_fixtures import build_model, micro_batches, run_iteration

    setup = _shared_setup(task)
    initialize_model_parallel(tensor_model_parallel_size=2)
    group = ps.get_tensor_and_context_parallel_group()
    assert dist.get_world_size(group) == 2
    batches = micro_batches(setup, mbs=1, count=2, dpo=dpo)
    plain = build_model(setup, dpo=dpo)
    shared = build_model(setup, dpo=dpo, enable_encoder_dp=True, group=group)
    assert shared.encodes_in_group and not plain.encodes_in_group
    with _counting() as every_rank:
        want = run_iteration(plain, batches, encode_first=False)
    with _counting() as once:
        got = run_iteration(shared, batches, encode_first=True)
    for m, (a, b) in enumerate(zip(want["losses"], got["losses"])):
        assert torch.equal(a, b), f"micro-batch {m}: loss {b.tolist()} vs {a.tolist()} encoding on every rank"
    assert len(got["grads"]) == len(want["grads"]) > 10
    for name, grad in want["grads"].items():
        assert torch.equal(got["grads"][name], grad), f"{name}: max |diff| {(got['grads'][name] - grad).abs().max()}"
    for a, b in zip(want["states"], got["states"]):
        assert torch.equal(a, b)
    # per micro-batch: the video(s), (i2v) each first frame; the prompt once
    videos = 2 if dpo else 1
    per_micro = videos * (2 if task == "i2v" else 1)
    assert every_rank == {"vae": 2 * per_micro, "llm": 2}, every_rank
    assert once == {"vae": per_micro, "llm": 1}, once  # this rank's micro-batch (m % 2 == rank) only
    dist.barrier()


@dist_case(world_size=2)
def case_t2v_encoding_once_per_group_gives_the_same_losses_and_gradients():
    _check_model("t2v")


@dist_case(world_size=2)
def case_i2v_encoding_once_per_group_gives_the_same_losses_and_gradients():
    _check_model("i2v")


@dist_case(world_size=2)
def case_i2v_dpo_encoding_once_per_group_gives_the_same_losses_and_gradients():
    _check_model("i2v", dpo=True)


@dist_case(world_size=2)
def case_the_builders_pass_the_group_on_raw_videos_and_give_a_notice_on_features():
    import mindspeed_mm.cli as cli
    from megatron.core import parallel_state as ps

    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.runtime import initialize_model_parallel
    from mindspeed_mm.training.builders import build_pretrain_model
    from mindspeed_mm.training.dpo import build_dpo_model
    from tests.helpers.encoder_dp_fixtures import set_encoder_dp
    from tests.helpers.training_fixtures import train_argv, write_training_configs

    setup = _shared_setup("t2v")
    root = Path(setup["root"])
    if dist.get_rank() == 0:
        set_encoder_dp(setup, True, "model_dpo_on.json", dpo=setup["dpo_section"])
        features = write_training_configs(root / "features")
        model = json.loads(features["model"].read_text())
        (root / "features" / "model_on.json").write_text(json.dumps({**model, "enable_encoder_dp": True}))
    dist.barrier()
    initialize_model_parallel(tensor_model_parallel_size=2)
    group = ps.get_tensor_and_context_parallel_group()
    notices, printed = [], cli.notice
    cli.notice = notices.append
    try:
        raw = {"data": setup["data"], "model": root / "model_dpo_on.json"}
        for build, entry in ((build_pretrain_model, "pretrain"), (build_dpo_model, "dpo")):
            model = build(parse_args(train_argv(raw, root / "unused", iters=1, tp=2), entry=entry))
            assert model.encodes_in_group and model.encoder_group is group, entry
        assert not notices, notices
        on_features = {"data": root / "features" / "data.json", "model": root / "features" / "model_on.json"}
        model = build_pretrain_model(parse_args(train_argv(on_features, root / "unused", iters=1, tp=2),
                                                entry="pretrain"))
        assert not model.encodes_in_group and not model.enable_encoder_dp
        assert len(notices) == 1 and "enable_encoder_dp has no effect" in notices[0], notices
    finally:
        cli.notice = printed
    dist.barrier()


def _metrics(save: Path) -> dict:
    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


@dist_case(world_size=2)
def case_tp2_pretrain_with_encoder_dp_logs_the_same_losses_and_grad_norms():
    from mindspeed_mm.training import pretrain
    from tests.helpers.encoder_dp_fixtures import set_encoder_dp
    from tests.helpers.training_fixtures import train_argv

    setup = _shared_setup("i2v")
    root = Path(setup["root"])
    counts = {}
    for enabled in (False, True):
        name = "on" if enabled else "off"
        if dist.get_rank() == 0:
            set_encoder_dp(setup, enabled, f"model_{name}.json")
        dist.barrier()
        paths = {"data": setup["data"], "model": root / f"model_{name}.json"}
        with _counting() as counts[name]:
            summary = pretrain(train_argv(paths, root / f"save_{name}", iters=2, tp=2,
                                          extra=["--no-save-optim", "--no-save-rng"]))
        assert summary["iteration"] == 2
    dist.barrier()
    off, on = _metrics(root / "save_off"), _metrics(root / "save_on")
    for it in (1, 2):
        assert (on[it]["loss"], on[it]["grad_norm"]) == (off[it]["loss"], off[it]["grad_norm"]), (it, on[it], off[it])
    # 2 iterations x 2 micro-batches of one i2v sample: the video and its first frame each; plus one Step-LLM call
    # per rank at build time, the empty prompt of caption dropout (preprocess_parameters.cfg, 0.1 by default)
    assert counts["off"] == {"vae": 8, "llm": 4 + 1}, counts
    assert counts["on"] == {"vae": 4, "llm": 2 + 1}, counts
    dist.barrier()


test_distributed = pytest_cases(globals())
