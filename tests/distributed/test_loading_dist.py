"""Bounded loading at TP=2 on gloo: each rank's parameters are exactly the adapter's shard of the files, and DPO's
actor and reference come from one read of the checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

_MARKS = ("tensor_model_parallel", "partition_dim", "partition_stride", "allreduce")
_folders = []


def _shared_folder(prefix: str) -> Path:
    box = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _folders.append(Path(box[0]))
    return Path(box[0])


def _remove_folders() -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        for folder in _folders:
            shutil.rmtree(folder, ignore_errors=True)
    _folders.clear()


def _official_and_split(i2v: bool):
    """An official folder (bf16 on disk) and its converter split at TP=2, written by rank 0."""
    from mindspeed_mm.checkpoint.convert import split
    from mindspeed_mm.tiny.dit import write_tiny_dit

    root = _shared_folder("loading_dist_")
    if dist.get_rank() == 0:
        write_tiny_dit(root / "transformer", use_additional_conditions=i2v, num_shards=3, seed=13,
                       dtype=torch.bfloat16)
        split(root / "transformer", root / "tp2", tp_size=2, pp_layers=[2], num_layers=2, log=lambda m: None)
    dist.barrier()
    return root / "transformer", root / "tp2"


def _adapter_shards(folder: Path, tp_rank: int, tp: int) -> dict:
    """What the old loader put in each parameter: permute the whole official tensor, then take the rank's shard."""
    from safetensors.torch import load_file

    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    on_disk = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return adapter.shard_state_dict(adapter.official_to_ours(on_disk, 16), tp_rank, tp)


@dist_case(world_size=2)
def case_tp2_parameters_are_exactly_the_adapters_shards():
    from megatron.core import parallel_state as ps

    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel

    for i2v in (False, True):
        official, converted = _official_and_split(i2v)
        for tp in (1, 2):  # TP=1 here still uses Megatron's parallel linears (DP=2)
            initialize_model_parallel(tensor_model_parallel_size=tp)
            want = _adapter_shards(official, ps.get_tensor_model_parallel_rank(), tp)
            sources = [official] + ([converted] if tp == 2 else [])
            for source in sources:
                for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    model = StepVideoDiT.from_pretrained(source, dtype=dtype)
                    got = model.state_dict()
                    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
                    for key, tensor in want.items():
                        assert got[key].dtype == torch_dtype and torch.equal(got[key], tensor.to(torch_dtype)), \
                            f"{source.name} TP={tp} {dtype}: {key} differs"
    _remove_folders()


def _args(load: Path, reference_path=None):
    """The flags training/builders.py and training/dpo.py read, for a fresh fp32 DPO run from `load`."""
    import json
    from types import SimpleNamespace

    from mindspeed_mm.config.model import DPOConfig, PredictorConfig
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    official = load.parent / "transformer"
    kwargs = adapter.predictor_kwargs_from_official_config(json.loads((official / "config.json").read_text()), "")
    predictor = PredictorConfig(**kwargs, channel_split=adapter.default_channel_split(kwargs["head_dim"]))
    dpo = DPOConfig(histogram_path="unused", reference_path=reference_path)
    return SimpleNamespace(mm=SimpleNamespace(model=SimpleNamespace(predictor=predictor, dpo=dpo)),
                           mm_model="model.json", load=str(load), finetune=False, bf16=False, fp16=False,
                           recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


@dist_case(world_size=2)
def case_dpo_actor_and_reference_share_one_read():
    """A fresh DPO run (the reference is --load): the checkpoint is read once and the actor is a copy of the
    reference, with its own memory and Megatron's TP marks; a reference from another path is read on its own."""
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel
    from mindspeed_mm.training import dpo

    initialize_model_parallel(tensor_model_parallel_size=2)
    official, converted = _official_and_split(True)
    reads = []
    original = StepVideoDiT.__dict__["from_pretrained"].__func__

    def counted(cls, path, *args, **kwargs):
        reads.append(str(path))
        return original(cls, path, *args, **kwargs)

    StepVideoDiT.from_pretrained = classmethod(counted)
    try:
        args = _args(converted)
        reference, record = dpo.build_reference(args)
        actor = dpo.build_actor(args, reference, record)
        assert reads == [str(converted)], reads
        alone = original(StepVideoDiT, converted, args.mm.model.predictor)
        ref_sd, actor_sd, alone_sd = reference.state_dict(), actor.state_dict(), alone.state_dict()
        assert actor_sd.keys() == ref_sd.keys()
        for key in ref_sd:
            assert torch.equal(actor_sd[key], ref_sd[key]) and torch.equal(actor_sd[key], alone_sd[key]), key
            assert actor_sd[key].data_ptr() != ref_sd[key].data_ptr(), f"{key} shares memory with the reference"
        ref_params = dict(reference.named_parameters())
        for name, param in actor.named_parameters():
            assert param.requires_grad
            assert [getattr(param, m, None) for m in _MARKS] == [getattr(ref_params[name], m, None) for m in _MARKS], \
                name
        assert actor.training and actor.predictor_config == reference.predictor_config

        reads.clear()
        args = _args(converted, reference_path=str(official))
        reference, record = dpo.build_reference(args)
        dpo.build_actor(args, reference, record)
        assert reads == [str(official), str(converted)], reads
    finally:
        StepVideoDiT.from_pretrained = classmethod(original)
    _remove_folders()


def _same(a, b, where="state") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@dist_case(world_size=2)
def case_resume_gives_the_optimizer_its_own_state():
    """load_training_state maps the rank file; the restored bf16 Adam state (fp32 main weights, moments, steps) equals
    the saved one, and nothing is left pointing into the file (torch's load_state_dict would keep the moments as
    views of it): after the call the file is not mapped any more."""
    import os
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_mm.checkpoint import checkpoint_file
    from mindspeed_mm.checkpoint.file_pages import _file_mappings
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel
    from mindspeed_mm.training.checkpointing import load_training_state, save_checkpoint
    from mindspeed_mm.training.optimizer import build_optimizer

    initialize_model_parallel(tensor_model_parallel_size=2)
    official, _ = _official_and_split(False)
    flags = SimpleNamespace(optimizer="adam", lr=1e-3, min_lr=0.0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.99,
                            adam_eps=1e-8, sgd_momentum=0.9, clip_grad=1.0, bf16=True, fp16=False,
                            use_distributed_optimizer=False, loss_scale=None, initial_loss_scale=2**32,
                            min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2, lr_warmup_iters=0,
                            lr_warmup_fraction=None, lr_decay_iters=None, train_iters=10, lr_warmup_init=0.0,
                            lr_decay_style="cosine")

    def build():
        dit = StepVideoDiT.from_pretrained(official, dtype="bf16")
        ddp = DistributedDataParallel(dit.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), dit)
        return (dit, ddp) + build_optimizer(flags, ddp)

    dit, ddp, optimizer, scheduler = build()
    generator = torch.Generator().manual_seed(7)
    for step in range(2):
        for param in ddp.parameters():
            param.main_grad.copy_(1e-3 * torch.randn(param.shape, generator=generator))
        optimizer.step()
        scheduler.step(increment=1)
    save = _shared_folder("resume_")
    save_checkpoint(save, 2, dit, optimizer, scheduler, 8, False, log=lambda m: None)
    _, _, restored, restored_scheduler = build()
    assert load_training_state(save, restored, restored_scheduler, False, log=lambda m: None) == (2, 8)
    _same(optimizer.state_dict(), restored.state_dict())
    path = checkpoint_file(save, ps.get_tensor_model_parallel_rank(), 2, 2)
    assert _file_mappings(os.path.realpath(path)) == [], f"{path} is still mapped after the resume"
    _remove_folders()


test_distributed = pytest_cases(globals())
