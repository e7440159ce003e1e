"""Megatron-core on gloo through the runtime: TP layers, RNG tracker, Ulysses, groups, DDP.

Every case runs on real processes under torchrun (see harness.py), through the same
`mindspeed_mm.runtime` start-up that the entry points use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.harness import dist_case, pytest_cases

ATOL = 1e-5


def _close(name, got, want, atol=ATOL, rtol=1e-5):
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{name}: max |diff| {diff:.3e} exceeds atol {atol} (rank {dist.get_rank()})")


def _transformer_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _tp_linear_pair_matches(gather_output: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    initialize_model_parallel(tensor_model_parallel_size=2)
    set_random_seed(1234)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    gen = torch.Generator().manual_seed(7)
    full1, full2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        for p in (*full1.parameters(), *full2.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    x_full = torch.randn(3, 5, 8, generator=gen)
    upstream = torch.randn(3, 5, 8, generator=gen)

    cfg = _transformer_config()
    col = ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                               gather_output=gather_output)
    row = RowParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=not gather_output, skip_bias_add=False)
    with torch.no_grad():
        col.weight.copy_(full1.weight.chunk(tp, 0)[tp_rank])
        col.bias.copy_(full1.bias.chunk(tp, 0)[tp_rank])
        row.weight.copy_(full2.weight.chunk(tp, 1)[tp_rank])
        row.bias.copy_(full2.bias)

    x = x_full.clone().requires_grad_(True)
    hidden, _ = col(x)
    out, _ = row(F.gelu(hidden))
    (out * upstream).sum().backward()

    x_ref = x_full.clone().requires_grad_(True)
    out_ref = full2(F.gelu(full1(x_ref)))
    (out_ref * upstream).sum().backward()

    _close("forward", out, out_ref)
    _close("input grad", x.grad, x_ref.grad)
    _close("column weight grad", col.weight.grad, full1.weight.grad.chunk(tp, 0)[tp_rank])
    _close("column bias grad", col.bias.grad, full1.bias.grad.chunk(tp, 0)[tp_rank])
    _close("row weight grad", row.weight.grad, full2.weight.grad.chunk(tp, 1)[tp_rank])
    _close("row bias grad", row.bias.grad, full2.bias.grad)


@dist_case(world_size=2)
def case_tp2_column_row_parallel_linear():
    _tp_linear_pair_matches(gather_output=False)


@dist_case(world_size=2)
def case_tp2_column_parallel_gather_output():
    # gather_output=True allocates with device=torch.cuda.current_device(): the CPU adaptor path.
    _tp_linear_pair_matches(gather_output=True)


def _ulysses_matches(cp: int, with_mask: bool):
    from megatron.core import parallel_state as ps

    from mindspeed_mm.models.common.attention import attention
    from mindspeed_mm.parallel import UlyssesAttention, split_forward_gather_backward
    from mindspeed_mm.runtime import initialize_model_parallel

    initialize_model_parallel(context_parallel_size=cp)
    group = ps.get_context_parallel_group()
    rank = ps.get_context_parallel_rank()
    gen = torch.Generator().manual_seed(11)
    b, s, n, d = 2, 8 * cp, 2 * cp, 8
    q_full, k_full, v_full, g_full = (torch.randn(b, s, n, d, generator=gen) for _ in range(4))
    mask_full = None
    if with_mask:
        lengths = torch.tensor([s - 3, s // 2 + 1])
        mask_full = torch.arange(s)[None, :] < lengths[:, None]

    leaves = [t.clone().requires_grad_(True) for t in (q_full, k_full, v_full)]
    q, k, v = (split_forward_gather_backward(t, group, dim=1) for t in leaves)
    local_mask = None if mask_full is None else mask_full.chunk(cp, dim=1)[rank]
    out = UlyssesAttention(lambda a, bb, c, m: attention(a, bb, c, m, backend="sdpa"), group)(q, k, v, local_mask)
    (out * g_full.chunk(cp, dim=1)[rank]).sum().backward()

    ref_leaves = [t.clone().requires_grad_(True) for t in (q_full, k_full, v_full)]
    ref = attention(*ref_leaves, mask_full, backend="sdpa")
    (ref * g_full).sum().backward()

    _close("ulysses forward", out, ref.chunk(cp, dim=1)[rank])
    # split_forward_gather_backward gathers the input gradient: every rank holds the full grad.
    for name, got, want in zip("qkv", leaves, ref_leaves):
        _close(f"ulysses d{name}", got.grad, want.grad)


@dist_case(world_size=2)
def case_cp2_ulysses_attention():
    _ulysses_matches(cp=2, with_mask=False)
    _ulysses_matches(cp=2, with_mask=True)


@dist_case(world_size=4)
def case_cp4_ulysses_attention():
    _ulysses_matches(cp=4, with_mask=False)
    _ulysses_matches(cp=4, with_mask=True)


@dist_case(world_size=2)
def case_split_gather_grad_scaling():
    from megatron.core import parallel_state as ps

    from mindspeed_mm.parallel import gather_forward_split_backward, split_forward_gather_backward
    from mindspeed_mm.runtime import initialize_model_parallel

    initialize_model_parallel(context_parallel_size=2)
    group = ps.get_context_parallel_group()
    x_full = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    for scale_split, scale_gather, factor in ((None, None, 1.0), ("down", "up", 1.0), (None, "up", 2.0)):
        x = x_full.clone().requires_grad_(True)
        local = split_forward_gather_backward(x, group, dim=1, grad_scale=scale_split)
        _close("split", local, x_full.chunk(2, dim=1)[ps.get_context_parallel_rank()])
        full = gather_forward_split_backward(local * 3.0, group, dim=1, grad_scale=scale_gather)
        _close("gather", full, x_full * 3.0)
        full.sum().backward()
        _close(f"grad scale {scale_split}/{scale_gather}", x.grad, torch.full_like(x_full, 3.0 * factor))


@dist_case(world_size=4)
def case_tp2_cp2_group_layout():
    from megatron.core import parallel_state as ps

    from mindspeed_mm.runtime import initialize_model_parallel

    layout = initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    rank = dist.get_rank()
    assert (layout.tensor, layout.context, layout.data) == (2, 2, 1), layout
    # Megatron's default order "tp-cp-ep-dp-pp": TP varies fastest, then CP, then DP.
    expected_tp = [[0, 1], [2, 3]]
    expected_cp = [[0, 2], [1, 3]]
    tp_group = next(g for g in expected_tp if rank in g)
    cp_group = next(g for g in expected_cp if rank in g)
    got = {
        "tp group": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "cp group": dist.get_process_group_ranks(ps.get_context_parallel_group()),
        "tp rank": ps.get_tensor_model_parallel_rank(),
        "cp rank": ps.get_context_parallel_rank(),
        "dp size": ps.get_data_parallel_world_size(),
        "dp-cp group": dist.get_process_group_ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        "tp-cp group": dist.get_process_group_ranks(ps.get_tensor_and_context_parallel_group()),
    }
    want = {
        "tp group": tp_group, "cp group": cp_group, "tp rank": rank % 2, "cp rank": rank // 2,
        "dp size": 1, "dp-cp group": cp_group, "tp-cp group": [0, 1, 2, 3],
    }
    assert got == want, f"rank {rank}: got {got}, want {want}"


@dist_case(world_size=4)
def case_tp2_dp2_rng_tracker():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    initialize_model_parallel(tensor_model_parallel_size=2)
    set_random_seed(1234)
    with get_cuda_rng_tracker().fork():
        tp_mask = F.dropout(torch.ones(4096), p=0.5)
    default_mask = F.dropout(torch.ones(4096), p=0.5)
    # A second fork continues the tracked stream rather than restarting it.
    with get_cuda_rng_tracker().fork():
        tp_mask_2 = F.dropout(torch.ones(4096), p=0.5)
    assert not torch.equal(tp_mask, tp_mask_2), "the tracker state did not advance between forks"

    def all_gather(t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return parts

    masks, defaults = all_gather(tp_mask), all_gather(default_mask)
    tp_rank = ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    assert (tp_rank, dp_rank) == (dist.get_rank() % 2, dist.get_rank() // 2)
    # ranks 0,1 are TP peers (DP 0); ranks 2,3 are TP peers (DP 1); 0 and 2 are DP peers.
    assert not torch.equal(masks[0], masks[1]), "TP peers drew the same dropout mask inside fork()"
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3]), "DP peers differ in fork()"
    assert all(torch.equal(defaults[0], m) for m in defaults), "default RNG differs across ranks"


def _adamw_step_matches(use_distributed_optimizer: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import MegatronModule

    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    initialize_model_parallel()
    set_random_seed(1234)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert dp == 2

    class TinyNet(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.fc1 = torch.nn.Linear(6, 12)
            self.fc2 = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    cfg = _transformer_config()
    torch.manual_seed(0)
    model = TinyNet(cfg)
    torch.manual_seed(0)
    reference = TinyNet(cfg)
    lr, wd, betas, eps, clip = 1e-2, 0.1, (0.9, 0.95), 1e-8, 0.5
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer), model
    )
    opt_config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=wd, adam_beta1=betas[0], adam_beta2=betas[1],
                                 adam_eps=eps, clip_grad=clip, use_distributed_optimizer=use_distributed_optimizer)
    opt = get_megatron_optimizer(opt_config, [ddp], config_overrides=get_standard_config_overrides(opt_config))
    # The scheduler is what turns each group's wd_mult (0 for biases) into its weight_decay.
    scheduler = OptimizerParamScheduler(
        opt, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0, lr_decay_steps=3, lr_decay_style="constant",
        start_wd=wd, end_wd=wd, wd_incr_steps=3, wd_incr_style="constant",
    )
    # Megatron exempts biases (and other 1-D params) from weight decay; the reference matches.
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() > 1], "weight_decay": wd},
         {"params": [p for p in reference.parameters() if p.dim() == 1], "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps,
    )
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        batch, target = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        local = slice(dp_rank * 4, dp_rank * 4 + 4)
        F.mse_loss(ddp(batch[local]), target[local]).backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok, "Megatron optimizer step reported failure"
        scheduler.step(1)

        ref_opt.zero_grad()
        F.mse_loss(reference(batch), target).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        _close(f"param {name} after 3 AdamW steps", p.detach(), q.detach(), atol=1e-6)


@dist_case(world_size=2)
def case_dp2_ddp_distributed_optimizer_matches_adamw():
    _adamw_step_matches(use_distributed_optimizer=True)


@dist_case(world_size=2)
def case_dp2_ddp_plain_optimizer_matches_adamw():
    _adamw_step_matches(use_distributed_optimizer=False)


test_distributed = pytest_cases(globals())
