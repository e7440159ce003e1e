"""StepVideo inference (推理), t2v and i2v: the entry point of examples/stepvideo/{t2v,i2v}/inference_*.sh.

    torchrun --nproc_per_node 4 inference_sora.py --mm-model examples/stepvideo/t2v/inference_t2v_model.json \
        --tensor-model-parallel-size 4 --context-parallel-size 1 --micro-batch-size 1 \
        --load StepVideo-Converted --seed 1234 [the seed's other Megatron flags]

Writes `video_{i}.mp4` for every prompt x num_inference_videos_per_sample and `video_grid.mp4` to the model
JSON's save_path. See docs/inference.md and mindspeed_mm/inference/runner.py.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    import torch
    import torch.distributed as dist

    from mindspeed_mm.arguments import parse_args, sequence_options
    from mindspeed_mm.inference import build_plan, dit_source, run_inference
    from mindspeed_mm.inference.runner import check_offload_options
    from mindspeed_mm.runtime import destroy_runtime, initialize_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, entry="inference")
    build_plan(args)  # prompt/image lists, sections and settings: fail before any process group or model exists
    dit_source(args)
    check_offload_options(args)
    owns_runtime = not dist.is_initialized()  # when called from a running job, leave its process group alone
    initialize_runtime(args.tensor_model_parallel_size, args.context_parallel_size, seed=args.seed,
                       backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes,
                       sequence=sequence_options(args))
    try:
        with torch.no_grad():
            run_inference(args)
    finally:
        if owns_runtime:
            destroy_runtime()
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
