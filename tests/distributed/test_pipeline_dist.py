"""Pipeline entry points on several gloo ranks (called in-process by each rank of the launch)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases


def _shared_tmp() -> Path:
    box = [tempfile.mkdtemp(prefix="mm_pipeline_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@dist_case(world_size=2)
def case_feature_extraction_data_parallel():
    from mindspeed_mm.tools.feature_extraction.get_sora_feature import feature_name, main
    from tests.helpers.pipeline_fixtures import feature_argv, write_configs

    root = _shared_tmp()
    if dist.get_rank() == 0:
        write_configs(root, "t2v")
    dist.barrier()
    paths = {"data": root / "data.json", "model": root / "model.json", "tools": root / "tools.json"}
    assert main(feature_argv(paths) + ["--global-batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (root / "features_out" / "data.jsonl").read_text().splitlines()]
    # Rank 0 took rows 0 and 2, rank 1 the corrupt row 1; the merged list keeps manifest order.
    assert [r["file"] for r in rows] == [f"features/{feature_name('videos/a/1.mp4')}",
                                         f"features/{feature_name('videos/b/1.mp4')}"]
    assert not list((root / "features_out").glob(".data.rank*"))
    dist.barrier()


# ---- inference (inference_sora.py / mindspeed_mm.inference) ------------------------------------------


_inference_roots = []


def _inference_download(root: Path) -> dict:
    """A tiny t2v download plus an i2v transformer/ of the same widths, written once per launch by rank 0 under
    the first case's folder and shared by the later cases."""
    from mindspeed_mm.tiny.dit import write_tiny_dit
    from mindspeed_mm.tiny.download import TINY_WIDTHS, write_tiny_download

    if not _inference_roots:
        _inference_roots.append(root)
    root = _inference_roots[0]
    if dist.get_rank() == 0 and not (root / "weights" / "model_sections.json").exists():
        sections = write_tiny_download(root / "weights", task="t2v")
        w = TINY_WIDTHS
        write_tiny_dit(root / "weights" / "transformer_i2v", num_shards=1, seed=1, num_layers=w["dit_layers"],
                       num_heads=w["dit_heads"], head_dim=w["dit_head_dim"], in_channels=sections["ae"]["z_channels"],
                       caption_channels=(w["llm_hidden"], w["clip_hidden"]), use_additional_conditions=True)
    dist.barrier()
    return json.loads((root / "weights" / "model_sections.json").read_text())


def _i2v_transformer() -> Path:
    return _inference_roots[0] / "weights" / "transformer_i2v"


def _local_reference(model_path: Path, prompts, seeds, images=None):
    """The same videos computed by one process alone (TP = CP = 1, no process group in the pipeline)."""
    from mindspeed_mm.config import from_dict
    from mindspeed_mm.config.model import MMModelConfig
    from mindspeed_mm.inference import StepVideoPipeline
    from mindspeed_mm.models.ae import StepVideoVAE
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
    from mindspeed_mm.runtime import initialize_model_parallel

    initialize_model_parallel(1, 1)
    cfg = from_dict(MMModelConfig, json.loads(model_path.read_text()), source=str(model_path))
    dit = StepVideoDiT.from_pretrained(cfg.predictor.from_pretrained, cfg.predictor).eval()
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    pipe = StepVideoPipeline.from_config(cfg, dit, StepVideoVAE.from_config(cfg.ae), encoder, None)
    latents = pipe(prompts, seeds=seeds, images=images, output="latent")
    _last_cache_stats[:] = [pipe.last_cache_stats]
    return latents


_last_cache_stats = [None]


def _assert_same_latents(got: dict, reference: torch.Tensor, what: str) -> None:
    """The final float32 latents, not the uint8 videos (a level of rounding hides errors up to 1/255)."""
    assert got, what
    for i, latents in got.items():
        diff = (latents - reference[i]).abs().max().item()
        # Batch composition and TP/CP reductions change float sums in the last bits: ~1e-6 on latents of scale 1.
        assert diff < 5e-5 * max(1.0, reference[i].abs().max().item()), (what, i, diff)


@dist_case(world_size=2)
def case_inference_dp2_and_tp2_match_one_process():
    from inference_sora import main
    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.inference import run_inference
    from mindspeed_mm.runtime import initialize_model_parallel
    from tests.helpers.inference_fixtures import inference_argv, model_json, write_lines

    root = _shared_tmp()
    sections = _inference_download(root)
    prompts = ["a cat walks along a windowsill", "一只猫", "waves on black rocks"]
    prompt_file = root / "prompts.txt"
    if dist.get_rank() == 0:
        write_lines(prompt_file, prompts)
        for name in ("dp", "tp"):
            model_json(sections, "t2v", root, prompt=prompt_file, save_path=root / name, name=f"{name}.json")
    dist.barrier()

    # TP = 2 through the command line: rank 0 (TP rank 0) writes the three videos and the grid.
    assert main(inference_argv(root / "tp.json", tp=2, seed=5)) == 0
    assert sorted(p.name for p in (root / "tp").iterdir()) == ["video_0.mp4", "video_1.mp4", "video_2.mp4",
                                                               "video_grid.mp4"]
    # Only the TP group's first rank loads the text encoders; the other receives the states.
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    builds, build = [], StepVideoTextEncoder.from_configs
    StepVideoTextEncoder.from_configs = lambda *a, **kw: builds.append(1) or build(*a, **kw)
    try:
        tp = run_inference(parse_args(inference_argv(root / "tp.json", tp=2, seed=5), entry="inference"),
                           keep_videos=True)
    finally:
        StepVideoTextEncoder.from_configs = build
    assert len(builds) == (1 if dist.get_rank() == 0 else 0)
    assert tp.indices == [0, 1, 2] and (tp.saved != []) == (dist.get_rank() == 0)

    # DP = 2, micro-batch 2: rank 0 makes videos 0 and 2 in one batch, rank 1 video 1; each saves its own.
    initialize_model_parallel(1, 1)
    dp = run_inference(parse_args(inference_argv(root / "dp.json", mbs=2, seed=5), entry="inference"),
                       keep_videos=True)
    assert dp.indices == ([0, 2] if dist.get_rank() == 0 else [1])
    assert [Path(p).name for p in dp.saved] == [f"video_{i}.mp4" for i in dp.indices]
    assert (dp.grid is not None) == (dist.get_rank() == 0)

    reference = _local_reference(root / "dp.json", prompts, seeds=[5, 6, 7])
    _assert_same_latents(tp.latents, reference, "TP=2")
    _assert_same_latents(dp.latents, reference, "DP=2")
    dist.barrier()


@dist_case(world_size=2)
def case_inference_i2v_cp2_matches_one_process():
    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.inference import run_inference
    from mindspeed_mm.runtime import initialize_model_parallel
    from tests.helpers.inference_fixtures import inference_argv, model_json, pattern_image, write_lines, write_png

    root = _shared_tmp()
    sections = _inference_download(root)
    i2v = dict(sections, predictor=dict(sections["predictor"], use_additional_conditions=True,
                                        from_pretrained=str(_i2v_transformer())))
    if dist.get_rank() == 0:
        write_lines(root / "prompts.txt", ["笑起来"])
        write_png(root / "first.png", pattern_image(40, 56))
        write_lines(root / "images.txt", [str(root / "first.png")])
        # 34 frames -> 6 latent frames: split over CP = 2 in the DiT, two VAE chunks decoded one per rank.
        model_json(i2v, "i2v", root, prompt=root / "prompts.txt", image=root / "images.txt", videos_per_prompt=2,
                   input_size=[34, 32, 32], name="i2v.json")
    dist.barrier()
    initialize_model_parallel(1, 2)
    cp = run_inference(parse_args(inference_argv(root / "i2v.json", cp=2, seed=9), entry="inference"),
                       keep_videos=True)
    assert cp.indices == [0, 1] and cp.videos[0].shape == (34, 32, 32, 3)
    assert not torch.equal(cp.videos[0], cp.videos[1])  # two samples of the prompt
    reference = _local_reference(root / "i2v.json", ["笑起来"] * 2, seeds=[9, 10], images=[root / "first.png"] * 2)
    _assert_same_latents(cp.latents, reference, "i2v CP=2")
    # Ring attention over CP, and TP with sequence parallel, sample the same latents.
    from mindspeed_mm.parallel.options import SequenceParallelOptions

    initialize_model_parallel(1, 2, options=SequenceParallelOptions("megatron_cp_algo"))
    ring = run_inference(parse_args(inference_argv(root / "i2v.json", cp=2, seed=9), entry="inference"),
                         keep_videos=True)
    _assert_same_latents(ring.latents, reference, "i2v ring CP=2")
    initialize_model_parallel(2, 1, options=SequenceParallelOptions(sequence_parallel=True))
    sp = run_inference(parse_args(inference_argv(root / "i2v.json", tp=2, seed=9), entry="inference"),
                       keep_videos=True)
    _assert_same_latents(sp.latents, reference, "i2v TP=2 + sequence parallel")
    dist.barrier()


@dist_case(world_size=2)
def case_inference_step_cache_ring_cp2_matches_one_process():
    """The first-block cache decides on the change summed over the CP group: every rank skips the same steps (a
    rank skipping alone would leave the other waiting in attention), and the latents are one process's."""
    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.inference import run_inference
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import initialize_model_parallel
    from tests.helpers.inference_fixtures import inference_argv, model_json, write_lines

    root = _shared_tmp()
    sections = _inference_download(root)
    path = root / "cache.json"
    if dist.get_rank() == 0:
        write_lines(root / "prompts.txt", ["a cat walks along a windowsill"])
        model_json(sections, "t2v", root, prompt=root / "prompts.txt", steps=8, name="cache.json")
        cfg = json.loads(path.read_text())
        cfg["pipeline_config"]["first_block_cache_threshold"] = 0.3
        path.write_text(json.dumps(cfg))
    dist.barrier()
    initialize_model_parallel(1, 2, options=SequenceParallelOptions("megatron_cp_algo"))
    ring = run_inference(parse_args(inference_argv(path, cp=2, seed=3), entry="inference"), keep_videos=True)
    reference = _local_reference(path, ["a cat walks along a windowsill"], seeds=[3])
    _assert_same_latents(ring.latents, reference, "step cache, ring CP=2")
    full, reused = _last_cache_stats[0]
    assert full >= 2 and reused >= 1, (full, reused)  # both decisions were taken (the same way on both ranks)
    dist.barrier()


@dist_case(world_size=2)
def case_inference_cfg_parallel_matches_one_process():
    """--use-cfg-parallel on DP 2: rank 0 runs the conditional half, rank 1 the unconditional half of the same two
    videos; the latents are one process's, and only rank 0 decodes and saves. Each copy runs with
    dit_layerwise_offload (the one-process reference without it), and with unload_text_encoder the text encoders are
    freed before sampling."""
    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.inference import run_inference
    from mindspeed_mm.runtime import initialize_model_parallel
    from tests.helpers.inference_fixtures import inference_argv, model_json, write_lines

    root = _shared_tmp()
    sections = _inference_download(root)
    prompts = ["a cat walks along a windowsill", "一只猫"]
    if dist.get_rank() == 0:
        write_lines(root / "prompts.txt", prompts)
        path = model_json(sections, "t2v", root, prompt=root / "prompts.txt", save_path=root / "cfg", steps=3,
                          name="cfg.json")
        path.write_text(json.dumps(dict(json.loads(path.read_text()), dit_layerwise_offload=True)))
    dist.barrier()
    initialize_model_parallel(1, 1)
    # unload_text_encoder (true in the JSON): the encoders are gone from host memory while the videos are sampled
    import weakref
    from mindspeed_mm.inference import StepVideoPipeline
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    encoders, alive, build, generate = [], [], StepVideoTextEncoder.from_configs, StepVideoPipeline.generate
    unloads, unload = [], StepVideoTextEncoder.offload  # dropped, not first copied to the host

    def from_configs(*a, **kw):
        encoder = build(*a, **kw)
        encoders.append(weakref.ref(encoder))
        return encoder

    def sampling(self, *a, **kw):
        alive.append(any(ref() is not None for ref in encoders))
        return generate(self, *a, **kw)

    StepVideoTextEncoder.from_configs, StepVideoPipeline.generate = from_configs, sampling
    StepVideoTextEncoder.offload = lambda self: unloads.append(1) or unload(self)
    try:
        out = run_inference(parse_args(inference_argv(root / "cfg.json", mbs=2, seed=11) + ["--use-cfg-parallel"],
                                       entry="inference"), keep_videos=True)
    finally:
        StepVideoTextEncoder.from_configs, StepVideoPipeline.generate = build, generate
        StepVideoTextEncoder.offload = unload
    assert encoders and alive == [False] and unloads == []
    assert out.indices == [0, 1]
    assert (out.saved != []) == (dist.get_rank() == 0) and (out.videos != {}) == (dist.get_rank() == 0)
    reference = _local_reference(root / "cfg.json", prompts, seeds=[11, 12])
    _assert_same_latents(out.latents, reference, "CFG parallel")

    # With the first-block cache both halves take the decision of the whole batch (the change summed over the
    # pair), so they skip the same steps as one process running both halves together.
    if dist.get_rank() == 0:
        cfg = json.loads((root / "cfg.json").read_text())
        cfg["pipeline_config"]["first_block_cache_threshold"] = 0.3
        cfg["diffusion"]["num_inference_timesteps"] = 8
        (root / "cfg_cache.json").write_text(json.dumps(dict(cfg, dit_layerwise_offload=False)))
    dist.barrier()
    cached = run_inference(parse_args(inference_argv(root / "cfg_cache.json", mbs=2, seed=11) + ["--use-cfg-parallel"],
                                      entry="inference"), keep_videos=True)
    reference = _local_reference(root / "cfg_cache.json", prompts, seeds=[11, 12])
    assert cached.cache_stats == [_last_cache_stats[0]], (cached.cache_stats, _last_cache_stats[0])
    full, reused = _last_cache_stats[0]
    assert full >= 2 and reused >= 1, (full, reused)
    _assert_same_latents(cached.latents, reference, "CFG parallel with the step cache")
    dist.barrier()


test_distributed = pytest_cases(globals())
