"""Pipeline entry points on several gloo ranks (called in-process by each rank of the launch)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases


def _shared_tmp() -> Path:
    box = [tempfile.mkdtemp(prefix="mm_pipeline_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@dist_case(world_size=2)
def case_feature_extraction_data_parallel():
    from mindspeed_mm.tools.feature_extraction.get_sora_feature import main
    from tests.helpers.pipeline_fixtures import feature_argv, write_configs

    root = _shared_tmp()
    if dist.get_rank() == 0:
        write_configs(root, "t2v")
    dist.barrier()
    paths = {"data": root / "data.json", "model": root / "model.json", "tools": root / "tools.json"}
    assert main(feature_argv(paths) + ["--global-batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (root / "features_out" / "data.jsonl").read_text().splitlines()]
    # Rank 0 took rows 0 and 2, rank 1 the corrupt row 1; the merged list keeps manifest order.
    assert [r["file"] for r in rows] == ["features/videos_a_1_mp4.pt", "features/videos_b_1_mp4.pt"]
    assert not list((root / "features_out").glob(".data.rank*"))
    dist.barrier()


test_distributed = pytest_cases(globals())
