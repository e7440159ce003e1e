"""The memory planner (mindspeed_mm/tools/memory_plan): its arithmetic against the real modules at small sizes, the
TP/CP/DP divisions, the token split (padding, sequence parallel, Ulysses, ring, hybrid), encoder DP, invalid layouts,
the order of the layouts that fit, and the CLI on the example launchers' flags.
(Measured peaks at real width: benchmarks/memory_plan_validation.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.checkpoint.stepvideo_layout import plan_for_parameter, split_dim
from mindspeed_mm.parallel.options import SequenceParallelOptions
from mindspeed_mm.tools.memory_plan import (GIB, DiTShape, Layout, RawVideo, Recompute, Training, VAEShape, Workload,
                                            block_activations, dit_parameters, fitting_layouts, layout_problems,
                                            plan_memory)
from mindspeed_mm.tools.memory_plan.cli import MemoryPlanError, main
from mindspeed_mm.tools.memory_plan.dit import (RING_QUERY_CHUNK, TokenSplit, activation_peak, backward_working_bytes,
                                                outside_block_activations, ring_attention_transient_bytes,
                                                sampling_forward)
from mindspeed_mm.tools.memory_plan.encoders import BertShape, StepLLMShape, vae_decode_working_bytes
from mindspeed_mm.tools.memory_plan.plan import Sampling, candidate_layouts, plan_sampling
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
    # The tokens are padded to a multiple of CP: the latent frames no longer have to divide (24 frames, CP 16).
    assert layout_problems(shape, work, Layout(1, 16, 1)) == []
    hybrid = Layout(8, 8, 1, cp_algo="hybrid_cp_algo", ulysses_degree=3)
    assert layout_problems(shape, work, hybrid) == ["the Ulysses degree 3 does not divide CP 8 (hybrid: CP = Ulysses "
                                                    "x ring)"]


def test_heads_rule_is_tp_times_the_ulysses_degree():
    """Ulysses splits each TP rank's heads over its degree u; a ring splits none: heads % (TP x u), not TP x CP."""
    shape, work = DiTShape(), Workload(1, 36, 34, 62)  # 48 heads: 6 per rank at TP 8

    def problems(cp, algo="ulysses_cp_algo", u=None):
        return layout_problems(shape, work, Layout(8, cp, 1, cp_algo=algo, ulysses_degree=u))

    assert problems(8) == ["num_heads 48 is not divisible by TP 8 x Ulysses degree 8 = 64 (ring attention, "
                           "megatron_cp_algo or hybrid_cp_algo, does not split heads)"]
    assert problems(12, "hybrid_cp_algo", 6) == []  # 48 % (8 x 6) == 0, although 48 % (8 x 12) != 0
    assert problems(8, "hybrid_cp_algo", 2) == []
    assert problems(8, "megatron_cp_algo") == [] and problems(16, "megatron_cp_algo") == []
    assert "TP 8 x Ulysses degree 4 = 32" in problems(8, "hybrid_cp_algo", 4)[0]
    assert problems(6) == []  # Ulysses over 6: 48 % 48 == 0
    # The degree is the launcher's (SequenceParallelOptions.ulysses_size).
    for algo, u in (("ulysses_cp_algo", None), ("megatron_cp_algo", None), ("hybrid_cp_algo", 2)):
        lay = Layout(8, 8, 1, cp_algo=algo, ulysses_degree=u)
        options = SequenceParallelOptions(algo, u)
        assert (lay.ulysses, lay.ring) == (options.ulysses_size(8), options.ring_size(8))


def test_padding_to_a_multiple_of_cp_and_tp_is_counted():
    """75 tokens a sample: CP 4 pads to 76 (19 a rank), with sequence parallel at TP 2 to 80 (20 a rank, 10 outside
    the matmuls). Ignoring the pad tokens would give 18 (75 // 4)."""
    shape = DiTShape(num_layers=2, num_heads=8, head_dim=128)
    work = Workload(1, 3, 5, 5)
    assert TokenSplit(1, 4).padded_tokens(75) == 76 and TokenSplit(2, 4, True).padded_tokens(75) == 80
    a, d = 2, shape.hidden
    cp4 = block_activations(shape, work, 1, 4, a)
    assert cp4.checkpoint_input == a * 19 * d and cp4.feed_forward == 2 * a * 19 * 4 * d
    sp = block_activations(shape, work, 2, 4, a, sequence_parallel=True)
    assert sp.checkpoint_input == a * 10 * d and sp.feed_forward == 2 * a * 20 * 4 * d // 2
    assert TokenSplit(2, 4, True).stream_tokens(75) == 10 and TokenSplit(2, 4, True).rank_tokens(75) == 20
    # No padding when the tokens divide: the old figures.
    even = Workload(1, 4, 5, 5)
    assert block_activations(shape, even, 1, 4, a).checkpoint_input == a * 25 * d


def test_sequence_parallel_divides_the_stream_not_the_core():
    """With SP the residual stream, the recomputed block's input and the final layer hold s / TP tokens; the
    attention and the FFN (heads and features split by TP) are unchanged; backward re-gathers one (s, D) input."""
    shape = DiTShape(num_layers=4, num_heads=8, head_dim=128)
    work = Workload(1, 8, 16, 16)  # 2048 tokens: no padding
    a, d, tp, cp = 2, shape.hidden, 4, 2
    s = 2048 // cp
    plain = block_activations(shape, work, tp, cp, a)
    sp = block_activations(shape, work, tp, cp, a, sequence_parallel=True)
    assert plain.checkpoint_input == a * s * d and sp.checkpoint_input == a * (s // tp) * d
    assert sp.residual == 9 * a * (s // tp) * d + 2 * 2 * 4 * (s // tp) + a * 8 * d
    assert plain.residual == 9 * a * s * d + 2 * 2 * 4 * s + a * 8 * d
    assert (sp.self_attention, sp.cross_attention, sp.feed_forward) == (
        plain.self_attention, plain.cross_attention, plain.feed_forward)
    final = "final norm and projection"
    assert (outside_block_activations(shape, work, cp, a, tp=tp, sequence_parallel=True)[final]
            == outside_block_activations(shape, work, cp, a, tp=tp)[final] // tp)
    # Backward: 2a s' D in flight, plus the gathered (s, D) input, plus the FFN hidden gradient and a weight gradient.
    wgrad = 2 * 4 * d * d // tp
    assert backward_working_bytes(shape, work, tp, cp, a, 2, sequence_parallel=True) == (
        2 * a * (s // tp) * d + a * s * d + a * s * 4 * d // tp + wgrad)
    assert backward_working_bytes(shape, work, tp, cp, a, 2) == 2 * a * s * d + a * s * 4 * d // tp + wgrad
    # At TP 1 the flag changes nothing (as the launcher: no effect).
    assert block_activations(shape, work, 1, cp, a, sequence_parallel=True) == block_activations(shape, work, 1, cp, a)
    on = plan_memory(shape, work, Layout(tp, cp, 1, Recompute("block", 4), sequence_parallel=True))
    off = plan_memory(shape, work, Layout(tp, cp, 1, Recompute("block", 4)))
    assert on.activations.peak < off.activations.peak
    assert on.activations.saved_by_blocks * tp == off.activations.saved_by_blocks


def test_ring_keeps_its_lse_and_has_kv_buffers_and_scores_in_flight():
    """Ring attention (megatron_cp_algo) keeps its local q, k, v (v a view of the qkv output), out and a float32
    log-sum-exp; two receive buffers of K and V and a float32 (2048 x keys) score block are in flight."""
    shape = DiTShape(num_layers=2, num_heads=8, head_dim=128)
    work = Workload(1, 8, 32, 32)  # 8192 tokens
    a, c, tp, cp = 2, 4, 2, 4
    s, dl, hl = 8192 // cp, shape.hidden // tp, shape.num_heads // tp
    ring = block_activations(shape, work, tp, cp, a, ulysses=1)
    lse, inv_rms = 4 * hl * s, 4 * s * hl * 2
    assert ring.self_attention == (8 * a + 2 * c) * s * dl + lse + inv_rms
    kv_buffers = 2 * 2 * a * s * dl
    scores = 4 * hl * min(s, RING_QUERY_CHUNK) * s
    assert ring.attention_transient == kv_buffers + scores
    # The transient is in the backward working set (here it outweighs the FFN's).
    working = backward_working_bytes(shape, work, tp, cp, a, 2, ulysses=1)
    assert working == 2 * a * s * shape.hidden + a * s * dl + kv_buffers + scores
    # Full recompute: the peak is the last block's backward, the transient on top of the rebuilt block.
    ringed = activation_peak(shape, work, tp, cp, Recompute("block", 2), a, 2, ulysses=1)
    outside = sum(ringed.outside.values()) - ringed.outside["final norm and projection"]
    assert ringed.peak == outside + ring.checkpoint_input + ring.total + working
    assert activation_peak(shape, work, tp, cp, Recompute("block", 2), a, 2).block.attention_transient == 0
    # Hybrid: Ulysses over u = 2 first (s x 2 tokens, Hl / 2 heads in the core), then a ring of 2.
    hybrid = block_activations(shape, work, tp, cp, a, ulysses=2)
    assert hybrid.self_attention == (7 * a + 2 * c) * s * dl + 4 * (hl // 2) * (2 * s) + inv_rms
    assert hybrid.attention_transient == kv_buffers + 4 * (hl // 2) * RING_QUERY_CHUNK * (2 * s)
    assert ring_attention_transient_bytes(shape, work, TokenSplit(tp, cp, ulysses=cp), a) == 0  # Ulysses: no ring
    # Through the layout: megatron_cp_algo is u = 1, hybrid_cp_algo --ulysses-degree-in-cp 2 is u = 2.
    assert plan_memory(shape, work, Layout(tp, cp, 1, cp_algo="megatron_cp_algo")).activations.block == ring
    assert plan_memory(shape, work, Layout(tp, cp, 1, cp_algo="hybrid_cp_algo",
                                           ulysses_degree=2)).activations.block == hybrid


def test_encoder_dp_holds_the_iterations_features():
    """enable_encoder_dp: num_micro_batches x micro-batch samples' latents and text states held on every rank
    (in the peak), and their pixels on the host (not in the peak); encoder activations unchanged."""
    shape = DiTShape(num_layers=2, num_heads=8, head_dim=128)
    work = Workload(1, 6, 34, 62)
    raw = RawVideo(vae=VAEShape(), vae_parameters=1000, vae_bytes=2, num_frames=34, height=544, width=992,
                   step_llm=StepLLMShape(), step_llm_bytes=2, clip=BertShape(), clip_bytes=4)
    layout = Layout(2, 2, 2)
    off = plan_memory(shape, work, layout, raw=raw)
    on = plan_memory(shape, work, layout, raw=replace(raw, encoder_dp=True, global_batch=8))
    samples = 8 // (1 * 2)  # 4 micro-batches of 1 on each of the 2 DP ranks
    features = 64 * 6 * 34 * 62 * 2 + 320 * 6144 * 2 + 77 * 1024 * 4
    assert on.held == {"encoder DP: the iteration's encoded features": samples * features}
    assert on.host == {"encoder DP: the iteration's pixels before encoding": samples * 4 * 34 * 3 * 544 * 992}
    assert on.peak - off.peak == samples * features and on.phases == off.phases
    i2v = plan_memory(replace(shape, i2v=True), work, layout, raw=replace(raw, encoder_dp=True, global_batch=8))
    assert i2v.held_total == samples * (features + 64 * 6 * 34 * 62 * 2)  # + the condition latents
    assert plan_memory(shape, work, layout, raw=None).held == {}
    # TP x CP = 1: every rank encodes its own micro-batches, nothing is shared (the model's notice: no effect).
    assert plan_memory(shape, work, Layout(1, 1, 4), raw=replace(raw, encoder_dp=True, global_batch=8)).held == {}
    # text_encoder_layerwise_offload: Step-LLM's layers leave the device but two.
    offloaded = plan_memory(shape, work, layout, raw=replace(raw, text_encoder_layerwise_offload=True))
    llm = StepLLMShape()
    assert off.persistent_total - offloaded.persistent_total == (llm.num_layers - 2) * llm.layer_parameters() * 2


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
            fewer = replace(lay, recompute=Recompute("block", recomputed - 1))
            assert plan_memory(shape, work, fewer).peak > budget


def test_the_search_enumerates_sequence_parallel_and_the_cp_algorithms():
    """At TP 8 (6 heads a rank) CP 12 runs as Ulysses 6 x ring 2 and CP 8 as Ulysses 2 x ring 4; each appears with
    sequence parallel off and on, named by its flags."""
    shape, work = DiTShape(), Workload(1, 36, 34, 62)
    flags = {lay.flags() for lay in candidate_layouts(shape, work, 96)}
    assert {"TP8 CP12 hybrid u6", "TP8 CP12 hybrid u6 +SP", "TP8 CP12 hybrid u2", "TP8 CP12 hybrid u3",
            "TP8 CP12 ring +SP", "TP8 CP1 +SP", "TP1 CP12 ulysses"} <= flags
    assert "TP8 CP12 ulysses" not in flags and "TP8 CP12 hybrid u4" not in flags  # 48 % 64, 48 % 32
    assert "TP1 CP1 +SP" not in flags  # sequence parallel needs TP > 1
    flags64 = {lay.flags() for lay in candidate_layouts(shape, work, 64)}
    assert {"TP8 CP8 hybrid u2", "TP8 CP8 hybrid u2 +SP", "TP8 CP8 ring"} <= flags64
    assert "TP8 CP8 ulysses" not in flags64
    lay = Layout(8, 8, 1, cp_algo="hybrid_cp_algo", ulysses_degree=2, sequence_parallel=True,
                 distributed_optimizer=True)
    assert lay.flags() == "TP8 CP8 hybrid u2 +SP"
    assert lay.launcher_flags() == ("--tensor-model-parallel-size 8 --context-parallel-size 8 --context-parallel-algo "
                                    "hybrid_cp_algo --ulysses-degree-in-cp 2 --sequence-parallel "
                                    "--use-distributed-optimizer")
    fits = fitting_layouts(shape, work, 64, 80 * 0.9 * GIB)
    found = {fit.layout.flags() for fit in fits}
    assert "TP8 CP8 hybrid u2 +SP" in found
    costs = [fit.cost() for fit in fits]
    assert costs == sorted(costs)


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
    # Ulysses over CP 8 at TP 8: 48 heads are not divisible by 64 (the launcher's ulysses_cp_algo).
    args = _launcher(I2V, "pretrain_i2v_model.json", "--world-size", "64", "--device-memory-gb", "80")
    args[args.index("--context-parallel-size") + 1] = "8"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "i2v pretraining" in out and "102 frames 544x992 -> 18 latent frames" in out
    assert "TP8 CP8 ulysses: invalid, no estimate" in out and "TP 8 x Ulysses degree 8 = 64" in out
    assert "peak: " not in out and "layouts that fit 80 GB" in out


def test_cli_takes_the_sequence_flags(capsys):
    """--sequence-parallel, --context-parallel-algo and --ulysses-degree-in-cp pass through the launcher's parser."""
    args = _launcher(T2V, "pretrain_t2v_model.json", "--world-size", "64", "--num-frames", "204",
                     "--sequence-parallel", "--ulysses-degree-in-cp", "2", "--device-memory-gb", "80")
    args[args.index("--context-parallel-size") + 1] = "8"
    args[args.index("--context-parallel-algo") + 1] = "hybrid_cp_algo"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "TP 8 x CP 8 (hybrid: Ulysses 2 x ring 4) x DP 1, sequence parallel, recompute block, 48 of 48" in out
    assert "75,888, padded to 75,904 (a multiple of CP x TP = 64; 16 masked); 9,488 on this rank, 1,186 outside" in out
    assert "self-attention core: 18,976 tokens x 3 heads per sample" in out and "ring of 4 ranks" in out
    assert "ring attention in flight" in out and "TP8 CP8 hybrid u2 +SP" in out
    with pytest.raises(MemoryPlanError, match="--ulysses-degree-in-cp"):
        main([a for a in args if a not in ("--ulysses-degree-in-cp", "2")])
    bad = list(args)
    bad[bad.index("--context-parallel-algo") + 1] = "ring"
    with pytest.raises(MemoryPlanError, match="--context-parallel-algo ring"):
        main(bad)


def test_cli_keeps_tensor_parallel_within_a_node(capsys):
    args = _launcher(T2V, "pretrain_t2v_model.json", "--nnodes", "2", "--nproc-per-node", "8", "--num-frames", "204",
                     "--device-memory-gb", "80", "--max-layouts", "100")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "world 16, TP dividing 8 (within a node)" in out and "TP8 CP2 ulysses +SP" in out and "TP16" not in out
    assert main(args + ["--node-size", "0"]) == 0
    assert "TP16 CP1 +SP" in capsys.readouterr().out


def test_cli_reports_encoder_dp(tmp_path, capsys):
    model = json.loads((T2V / "posttrain_t2v_model.json").read_text())
    model["enable_encoder_dp"] = True
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    args = LAUNCHER_FLAGS + ["--mm-data", str(T2V / "data_dpo.json"), "--mm-model", str(path), "--world-size", "8"]
    args[args.index("--global-batch-size") + 1] = "4"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "encoder DP (enable_encoder_dp; 4 micro-batches x 1)" in out
    assert "the iteration's encoded features (device, held through the step)" in out
    assert "the iteration's pixels before encoding (host, not in the peak)" in out and "+ encoder DP" in out


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
    script = _script("memory_plan_table")
    assert script.main(["--worlds", "16", "--devices", "80", "--family-worlds"]) == 0
    out = capsys.readouterr().out
    assert "| t2v | 136 (50,592) | 16 | TP8 CP2 ulysses +SP, rc 25, DO: 72 (11) |" in out
    assert script.main(["--worlds", "8", "--devices", "96", "--family-worlds", "16"]) == 0
    out = capsys.readouterr().out
    assert "| t2v | 204 (75,888) | 8 | TP8 CP1 +SP, rc 44: 85 (1) |" in out
    # Without sequence parallel, the old search's answer (docs/performance.md before SP): unchanged.
    assert "| 16 | Ulysses, no SP | TP4 CP4 ulysses, rc 44, DO: 86 (2) |" in out


def test_validation_script_predicts_its_cases():
    validation = _script("memory_plan_validation")
    cases = validation.default_suite(quick=False)
    assert {(c["tp"], c["cp"]) for c in cases} == {(1, 1), (2, 1), (1, 2)}
    for case in cases:
        figures = validation.predict(case, "cpu")
        assert figures["predicted"] > 0
        if case["kind"] == "training":
            assert 0 < figures["predicted_persistent"] < figures["predicted"]


def test_sp_activation_script_arithmetic():
    """benchmarks/activation_memory_sp.py without launching ranks (its --dry run takes ~30 s on two cores): the
    planner's figures it prints, and its table."""
    script = _script("activation_memory_sp")
    for dry in (True, False):
        cfg = script.settings(dry)
        for shape in cfg["shapes"]:
            for recompute in (False, True):
                assert 0 < script.predict(cfg, shape, True, recompute) < script.predict(cfg, shape, False, recompute)
    rows = [{"rank": r, "sp": sp, "recompute": rc, "tokens": 1024, "saved_blocks": 100 if sp else 200,
             "saved_all": 150 if sp else 300, "peak": (400 if sp else 500) + r, "predicted": 1}
            for r in (0, 1) for sp in (False, True) for rc in (False, True)]
    out = script.table(rows)
    assert out.count("| 1024 |") == 2 and "| 0.50 |" in out and "| 0.80 |" in out


# --- sampling (inference) -------------------------------------------------------------------


def _sampling(**kw) -> Sampling:
    return Sampling(**{"step_llm": StepLLMShape(), "clip": BertShape(), "vae_parameters": 1000, **kw})


@pytest.mark.parametrize("tp,dtype,a", [(1, "bf16", 2), (2, "bf16", 2), (4, "fp32", 4)])
def test_sampling_dit_weights_are_the_modules_parameters(tp, dtype, a):
    """The sampling phase's DiT weights: the real module's parameters in its dtype, the TP-split ones / TP (the
    parallel plan's split, as test_tensor_parallel_share_follows_the_parallel_plan counts it)."""
    dit = _meta_dit(**{**TINY, "num_heads": 4, "dtype": dtype})
    expected = 0
    for key, tensor in dit.state_dict().items():
        plan, leaf = plan_for_parameter(key)
        split = plan is not None and split_dim(plan, leaf) is not None
        expected += (tensor.numel() // tp if split else tensor.numel()) * tensor.element_size()
    shape = DiTShape.from_config(dit.predictor_config)
    sampled = plan_sampling(shape, Workload(1, 3, 8, 8, 5, 3), Layout(tp, 1, 1), _sampling(dit_bytes=a))
    weights = [v for k, v in sampled.phases["sample"].items() if k.startswith("DiT weights")]
    assert weights == [expected]
    assert sampled.phases["decode"][next(k for k in sampled.phases["decode"] if k.startswith("DiT"))] == expected


def test_cfg_parallel_halves_the_sampling_activations():
    shape, work = DiTShape(num_layers=2, num_heads=8, head_dim=128), Workload(1, 8, 16, 16)  # 2,048: no padding
    for tp, cp in ((1, 1), (2, 2)):
        together = plan_sampling(shape, work, Layout(tp, cp, 1), _sampling())
        halves = plan_sampling(shape, work, Layout(tp, cp, 2), _sampling(cfg_parallel=True))
        assert (together.workload.batch, halves.workload.batch) == (2, 1)
        one, two = halves.forward, together.forward
        assert (2 * one.self_attention, 2 * one.feed_forward, 2 * one.patch_embedding) == (
            two.self_attention, two.feed_forward, two.patch_embedding)
        assert one.peak < two.peak
    unguided = plan_sampling(shape, work, Layout(1, 1, 1), _sampling(guided=False))
    assert unguided.forward == plan_sampling(shape, work, Layout(1, 1, 2), _sampling(cfg_parallel=True)).forward


def test_sampling_forward_keeps_nothing_for_backward():
    """Without autograd a block's moment is far below what a block keeps for backward, and 48 blocks cost no more
    than 2 (only what every block shares stays)."""
    work = Workload(2, 8, 16, 16)
    small, big = DiTShape(num_layers=2), DiTShape(num_layers=48)
    assert sampling_forward(small, work, 1, 1, 2) == sampling_forward(big, work, 1, 1, 2)
    forward = sampling_forward(big, work, 1, 1, 2)
    assert forward.block < block_activations(big, work, 1, 1, 2).total
    a, s, d = 2, 2 * 2048, big.hidden
    assert forward.feed_forward == 2 * a * s * d + 2 * a * s * 4 * d  # residual stream + FFN hidden, GELU in and out
    # At CP 8 the whole sequence's patch embedding (before the split) is the largest moment.
    assert sampling_forward(big, work, 1, 8, 2).peak == a * 2 * (64 * 2048 + 2 * 2048 * d)  # a x b x ...


def test_unload_text_encoder_removes_them_from_sampling():
    shape, work = DiTShape(num_layers=2, num_heads=8, head_dim=128), Workload(1, 8, 16, 16)
    kept = plan_sampling(shape, work, Layout(1, 1, 1), _sampling(unload_text_encoder=False))
    unloaded = plan_sampling(shape, work, Layout(1, 1, 1), _sampling(unload_text_encoder=True))
    encoders = StepLLMShape().parameters() * 2 + BertShape().parameters() * 4
    for phase in ("sample", "decode"):
        assert kept.phase_total(phase) - unloaded.phase_total(phase) == encoders
        assert not any("step_llm" in name or "CLIP" in name for name in unloaded.phases[phase])
    assert kept.phases["encode text"] == unloaded.phases["encode text"]
    assert "DiT" not in " ".join(kept.phases["encode text"])  # the DiT loads after the prompts are encoded
    assert unloaded.peak_phase == "encode text" and kept.peak_phase == "decode"


def test_layerwise_offload_keeps_two_layers_of_each_stack_on_the_device():
    """dit_layerwise_offload: the DiT's weights outside the blocks and two blocks (the running one and the prefetched
    next, models/common/offload.py), counted on the real module; text_encoder_layerwise_offload: Step-LLM's
    embedding and two layers, counted on a real (meta) Step-LLM."""
    from mindspeed_mm.models.text_encoder.step_llm import StepLLMConfig, StepLLMEncoder

    dit = _meta_dit(**{**TINY, "num_layers": 5, "dtype": "fp32"})
    on_device = sum(t.numel() * t.element_size() for k, t in dit.state_dict().items()
                    if not k.startswith("transformer_blocks.") or k.split(".")[1] in ("0", "1"))
    shape, work = DiTShape.from_config(dit.predictor_config), Workload(1, 3, 8, 8, 5, 3)
    llm_shape = StepLLMShape(hidden_size=64, num_layers=4, num_attention_heads=4, num_attention_groups=2,
                             ffn_hidden_size=200, padded_vocab_size=128)
    with torch.device("meta"):
        llm = StepLLMEncoder(StepLLMConfig(hidden_size=64, num_layers=4, num_attention_heads=4, num_attention_groups=2,
                                           ffn_hidden_size=200, padded_vocab_size=128))
    llm_on_device = sum(t.numel() for k, t in llm.state_dict().items()
                        if not k.startswith("transformer.layers.") or k.split(".")[2] in ("0", "1")) * 2
    plain = plan_sampling(shape, work, Layout(1, 1, 1),
                          _sampling(dit_bytes=4, step_llm=llm_shape, unload_text_encoder=True))
    offloaded = plan_sampling(shape, work, Layout(1, 1, 1),
                              _sampling(dit_bytes=4, step_llm=llm_shape, unload_text_encoder=True,
                                        dit_layerwise_offload=True,
                                        text_encoder_layerwise_offload=True))
    for phase in ("sample", "decode"):
        assert [v for k, v in offloaded.phases[phase].items() if k.startswith("DiT weights")] == [on_device]
        assert plain.phase_total(phase) - offloaded.phase_total(phase) == 3 * sum(
            t.numel() * 4 for k, t in dit.state_dict().items() if k.startswith("transformer_blocks.4."))
    assert [v for k, v in offloaded.phases["encode text"].items() if k.startswith("step_llm")] == [llm_on_device]
    assert llm_shape.parameters() == sum(p.numel() for p in llm.parameters())


def test_cli_plans_layerwise_offload_and_refuses_it_with_tp(capsys, tmp_path):
    cfg = json.loads((T2V / "inference_t2v_model.json").read_text())
    cfg.update(dit_layerwise_offload=True, text_encoder_layerwise_offload=True)
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(cfg))
    assert main(["--mm-model", str(path), "--bf16", "--inference"]) == 0
    out = capsys.readouterr().out
    assert "dit_layerwise_offload true" in out and "text_encoder_layerwise_offload true" in out
    assert "DiT weights: 2 of 48 blocks + the rest (offload)" in out and "in the sample phase" in out
    with pytest.raises(MemoryPlanError, match="offload.json: dit_layerwise_offload runs with TP = CP = 1"):
        main(["--mm-model", str(path), "--bf16", "--inference", "--tensor-model-parallel-size", "2"])


def test_text_encoder_batch_is_the_runners():
    from mindspeed_mm.inference.runner import TEXT_ENCODER_BATCH as runner_batch
    from mindspeed_mm.tools.memory_plan.plan import TEXT_ENCODER_BATCH

    assert TEXT_ENCODER_BATCH == runner_batch


def test_vae_decode_estimate_follows_the_documented_figures():
    vae = VAEShape()
    assert vae_decode_working_bytes(vae, 1, 544, 992, 4) == int(23.7 * GIB)  # untiled, extrapolated
    assert vae_decode_working_bytes(vae, 1, 544, 992, 4, tile=256) == int(4.1 * GIB)  # tiled, measured
    assert vae_decode_working_bytes(vae, 1, 544, 992, 2, tile=256) == int(4.1 * GIB / 2)  # bf16: half


@pytest.mark.parametrize("folder,model,frames", [(T2V, "inference_t2v_model.json", "204 frames 544x992 -> 36"),
                                                 (I2V, "inference_i2v_model.json", "102 frames 544x992 -> 18")])
def test_cli_plans_sampling_on_the_example_inference_jsons(capsys, folder, model, frames):
    base = ["--mm-model", str(folder / model), "--tensor-model-parallel-size", "4", "--context-parallel-size", "1",
            "--bf16"]
    assert main(base + ["--inference"]) == 0
    out = capsys.readouterr().out
    assert "sampling (inference)" in out and frames in out
    for phase in ("phase: encode text", "phase: sample", "phase: decode"):
        assert phase in out
    assert "peak: " in out and "GiB in the encode text phase" in out  # unload_text_encoder true in both examples
    assert "2 samples a forward" in out and "= 4 rank(s)" in out
    assert main(base + ["--use-cfg-parallel", "--device-memory-gb", "80"]) == 0  # detected: pipeline_config
    out = capsys.readouterr().out
    assert "CFG parallel" in out and "1 sample(s) a forward" in out and "= 8 rank(s)" in out
    assert "fits 80 GB per device" in out
