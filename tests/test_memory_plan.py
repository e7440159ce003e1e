"""The memory planner (mindspeed_mm/tools/memory_plan): its arithmetic against the real modules at small sizes, the
TP/CP/DP divisions, invalid layouts, the order of the layouts that fit, and the CLI on the example launchers' flags.
(Measured peaks at real width: benchmarks/memory_plan_validation.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.predictor.stepvideo.parallelize import plan_for_parameter, split_dim
from mindspeed_mm.tools.memory_plan import (GIB, DiTShape, Layout, Recompute, Training, VAEShape, Workload,
                                            block_activations, dit_parameters, fitting_layouts, layout_problems,
                                            plan_memory)
from mindspeed_mm.tools.memory_plan.cli import MemoryPlanError, main
from mindspeed_mm.tools.memory_plan.encoders import StepLLMShape
from tests.helpers.saved_tensors import saved_bytes_per_block

REPO = Path(__file__).resolve().parents[1]
T2V = REPO / "examples" / "stepvideo" / "t2v"
I2V = REPO / "examples" / "stepvideo" / "i2v"

TINY = dict(num_layers=2, num_heads=2, head_dim=16, channel_split=[8, 4, 4], caption_channels=[24, 8], in_channels=4,
            out_channels=4)


def _meta_dit(**kw) -> StepVideoDiT:
    return StepVideoDiT(PredictorConfig(**kw), device="meta", perform_initialization=False)


def test_the_planner_is_arithmetic_without_torch():
    code = "import sys, mindspeed_mm.tools.memory_plan; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    TINY,
    {**TINY, "use_additional_conditions": True, "patch_size": 2, "patch_size_thw": [1, 2, 2]},
    {**TINY, "norm_elementwise_affine": True, "attention_norm_elementwise_affine": False},
    {"num_layers": 1},  # real width: hidden 6144, 48 heads x 128
    {"num_layers": 1, "use_additional_conditions": True},
])
def test_parameter_count_equals_the_module(kw):
    dit = _meta_dit(**kw)
    assert dit_parameters(DiTShape.from_config(dit.predictor_config)).total == sum(p.numel() for p in dit.parameters())


def test_released_parameter_counts():
    # STEPVIDEO_REFERENCE.md section 1, from the instantiated official model.
    assert dit_parameters(DiTShape()).total == 29_342_478_400
    assert dit_parameters(DiTShape(i2v=True)).total == 29_382_205_504
    # The released step_llm's safetensors index: 39,159,201,792 bytes in bf16.
    assert StepLLMShape().parameters() * 2 == 39_159_201_792


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_share_follows_the_parallel_plan(tp):
    """The rank's share is what parallelize's TP plan splits, / TP, plus everything it replicates."""
    dit = _meta_dit(**{**TINY, "num_heads": 4})
    expected = 0
    for key, tensor in dit.state_dict().items():
        plan, leaf = plan_for_parameter(key)
        split = plan is not None and split_dim(plan, leaf) is not None
        expected += tensor.numel() // tp if split else tensor.numel()
    assert dit_parameters(DiTShape.from_config(dit.predictor_config)).per_rank(tp) == expected


# --- activations ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,a", [("bf16", 2), ("fp32", 4)])
def test_block_activations_equal_autograds_saved_tensors(dtype, a):
    per_block, shape, workload = saved_bytes_per_block(dtype)
    predicted = block_activations(shape, workload, tp=1, cp=1, a=a).total
    # Block 1 holds only its own tensors; block 0 also first saves what all blocks share (RoPE tables, text).
    # Under TP and CP: tests/distributed/test_memory_plan_dist.py.
    assert predicted == pytest.approx(per_block[1], rel=0.02)


def test_tensor_and_context_parallel_divide_activations():
    shape = DiTShape(num_layers=4, num_heads=8, head_dim=128)
    work = Workload(1, 8, 16, 16)
    one = block_activations(shape, work, 1, 1, 2)
    tp2 = block_activations(shape, work, 2, 1, 2)
    cp2 = block_activations(shape, work, 1, 2, 2)
    assert tp2.residual == one.residual  # no sequence parallel: the (s, D) stream is whole on every TP rank
    assert tp2.feed_forward * 2 == one.feed_forward
    assert cp2.residual < one.residual and cp2.feed_forward * 2 == one.feed_forward
    assert cp2.checkpoint_input * 2 == one.checkpoint_input == 2 * 8 * 256 * shape.hidden


def test_recompute_keeps_inputs_and_rebuilds_one_block():
    shape = DiTShape(num_layers=6, num_heads=8, head_dim=128)
    work = Workload(1, 8, 16, 16)

    def peak(recompute):
        plan = plan_memory(shape, work, Layout(1, 1, 1, recompute))
        return plan.activations

    none, full, half = peak(Recompute()), peak(Recompute("block", 6)), peak(Recompute("block", 3))
    block = none.block
    assert none.saved_by_blocks == 6 * block.total
    assert full.saved_by_blocks == 6 * block.checkpoint_input
    assert half.saved_by_blocks == 3 * block.checkpoint_input + 3 * block.total
    assert full.peak - none.peak == 5 * block.checkpoint_input - 5 * block.total
    uniform = peak(Recompute("uniform", 3))  # two groups of three: the last group is rebuilt whole
    last_group, last_block = block.checkpoint_input + 3 * block.total, 5 * block.checkpoint_input + block.total
    assert uniform.peak - full.peak == last_group - last_block


# --- persistent memory and the optimizer ----------------------------------------------------


def test_distributed_optimizer_shards_over_data_and_context_parallel():
    shape = DiTShape(num_layers=2, num_heads=8, head_dim=128)
    work = Workload(1, 4, 8, 8)
    params = dit_parameters(shape).per_rank(2)
    plain = plan_memory(shape, work, Layout(2, 2, 4, distributed_optimizer=False))
    sharded = plan_memory(shape, work, Layout(2, 2, 4, distributed_optimizer=True))
    assert plain.persistent == {"DiT parameters (bf16/fp16)": 2 * params, "gradient buffer (fp32)": 4 * params,
                                "master weights (fp32)": 4 * params, "Adam states (2 x fp32)": 8 * params}
    shards = 4 * 2  # DP x CP
    assert sharded.persistent["master weights (fp32, / 8 (distributed optimizer))"] == 4 * params // shards
    assert sharded.persistent["Adam states (2 x fp32, / 8 (distributed optimizer))"] == 8 * params // shards
    fp32 = plan_memory(shape, work, Layout(2, 2, 4), Training(dtype_bytes=4))
    assert "master weights (fp32)" not in fp32.persistent  # fp32 parameters are their own master copy
    dpo = plan_memory(shape, work, Layout(2, 2, 4), Training(dpo=True))
    assert dpo.persistent["DPO reference DiT (bf16/fp16, frozen)"] == 2 * params
    assert dpo.workload.batch == 2  # winner and loser in one actor batch


# --- layouts --------------------------------------------------------------------------------


def test_invalid_layouts_are_reported_not_estimated():
    shape, work = DiTShape(), Workload(1, 24, 34, 62)
    assert layout_problems(shape, work, Layout(8, 2, 1)) == []
    heads = plan_memory(shape, work, Layout(5, 1, 1))
    assert not heads.valid and heads.peak is None and "num_heads 48" in heads.problems[0]
    frames = layout_problems(shape, work, Layout(1, 16, 1))
    assert frames == ["24 latent frames are not divisible by CP 16"]


def test_fits_are_cheapest_first_and_use_the_least_recompute():
    shape, work = DiTShape(), Workload(1, 24, 34, 62)
    budget = 80 * 0.9 * GIB
    fits = fitting_layouts(shape, work, 32, budget)
    assert fits
    costs = [fit.cost() for fit in fits]
    assert costs == sorted(costs)
    for fit in fits:
        lay = fit.layout
        assert fit.plan.peak <= budget and lay.world == 32 and not layout_problems(shape, work, lay)
        recomputed = lay.recompute.recomputed_layers(shape.num_layers)
        if recomputed:  # one block fewer would not fit
            fewer = Layout(lay.tp, lay.cp, lay.dp, Recompute("block", recomputed - 1), lay.distributed_optimizer)
            assert plan_memory(shape, work, fewer).peak > budget


def test_vae_latent_frames_follow_its_chunks():
    vae = VAEShape()
    assert [vae.latent_frames(n) for n in (204, 136, 102, 17, 1, 18, 26)] == [36, 24, 18, 3, 1, 4, 5]
    assert vae.frames_problem(20) is not None and vae.frames_problem(136) is None
    assert vae.latent_size(544, 992) == (34, 62)


# --- the command line -----------------------------------------------------------------------

# The flags of examples/stepvideo/t2v/pretrain_t2v.sh (defaults: 8 ranks, TP 8, CP 1), as it passes them.
LAUNCHER_FLAGS = [
    "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "1",
    "--virtual-pipeline-model-parallel-size", "1", "--context-parallel-size", "1",
    "--context-parallel-algo", "ulysses_cp_algo", "--micro-batch-size", "1", "--global-batch-size", "1",
    "--lr", "1e-5", "--min-lr", "1e-5", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-15",
    "--lr-decay-style", "constant", "--weight-decay", "1e-2", "--lr-warmup-init", "1e-5", "--lr-warmup-iters", "0",
    "--clip-grad", "1.0", "--train-iters", "5000", "--no-gradient-accumulation-fusion",
    "--load", "your_converted_dit_ckpt_dir", "--bf16", "--recompute-granularity", "full",
    "--recompute-method", "block", "--recompute-num-layers", "48", "--use-distributed-optimizer", "--allow-tf32",
    "--num-workers", "8", "--mm-tool", "./mindspeed_mm/tools/tools.json", "--log-interval", "1",
    "--save-interval", "10000", "--eval-interval", "10000", "--eval-iters", "10", "--save", "your_ckpt_path_to_save",
    "--ckpt-format", "torch", "--distributed-backend", "nccl",
]


def _launcher(folder: Path, model: str, *extra: str):
    return LAUNCHER_FLAGS + ["--mm-data", str(folder / "data_static_resolution.json"),
                             "--mm-model", str(folder / model), *extra]


def test_cli_on_the_t2v_launcher(capsys):
    assert main(_launcher(T2V, "pretrain_t2v_model.json", "--world-size", "8", "--device-memory-gb", "141")) == 0
    out = capsys.readouterr().out
    assert "t2v pretraining on extracted features, bf16" in out
    assert "136 frames 544x992 -> 24 latent frames x 34 x 62 = 50,592 tokens" in out
    assert "DiT parameters on this rank: 3,777,114,688 of 29,342,478,400" in out
    assert "layout: world 8 = TP 8 x CP 1 x DP 1, recompute block, 48 of 48 blocks" in out
    assert "peak: " in out and "layouts that fit 141 GB" in out


def test_cli_on_the_i2v_launcher_reports_an_invalid_layout(capsys):
    args = _launcher(I2V, "pretrain_i2v_model.json", "--world-size", "16", "--device-memory-gb", "80")
    args[args.index("--context-parallel-size") + 1] = "16"
    args[args.index("--tensor-model-parallel-size") + 1] = "1"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "i2v pretraining" in out and "102 frames 544x992 -> 18 latent frames" in out
    assert "invalid, no estimate" in out and "18 latent frames are not divisible by CP 16" in out
    assert "peak: " not in out and "layouts that fit 80 GB" in out


def test_cli_dpo_counts_the_reference_and_the_encoders(capsys):
    args = LAUNCHER_FLAGS + ["--mm-data", str(T2V / "data_dpo.json"),
                             "--mm-model", str(T2V / "posttrain_t2v_model.json"), "--world-size", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "t2v DPO post-training on raw videos" in out
    assert "DPO reference DiT" in out and "Video-VAE (frozen)" in out and "step_llm text encoder (frozen)" in out
    assert "the actor runs winner and loser: 2 samples" in out
    assert "the released step_llm" in out  # its config.json is not there: the released sizes are used


def test_cli_errors_name_the_flag_or_key(capsys):
    with pytest.raises(MemoryPlanError, match="--num-frames: 20 frames"):
        main(_launcher(T2V, "pretrain_t2v_model.json", "--num-frames", "20"))
    with pytest.raises(MemoryPlanError, match="--device-memory-gb"):
        main(_launcher(T2V, "pretrain_t2v_model.json", "--device-memory-gb", "0"))
    with pytest.raises(MemoryPlanError, match=r"preprocess_parameters.max_height / --max-width: frame size 544x1000"):
        main(_launcher(T2V, "pretrain_t2v_model.json", "--max-width", "1000"))


# --- the benchmark scripts (their arithmetic side; the measurements take minutes) -----------


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_model_table_script(capsys):
    assert _script("memory_plan_table").main(["--worlds", "16", "--devices", "80"]) == 0
    out = capsys.readouterr().out
    assert "| t2v | 136 (50,592) | 16 | TP8 CP2, rc 44, DO: 70 (3) |" in out


def test_validation_script_predicts_its_cases():
    validation = _script("memory_plan_validation")
    cases = validation.default_suite(quick=False)
    assert {(c["tp"], c["cp"]) for c in cases} == {(1, 1), (2, 1), (1, 2)}
    for case in cases:
        figures = validation.predict(case, "cpu")
        assert figures["predicted"] > 0
        if case["kind"] == "training":
            assert 0 < figures["predicted_persistent"] < figures["predicted"]
