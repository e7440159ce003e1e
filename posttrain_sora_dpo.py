"""DPO post-training entry point, launched by examples/stepvideo/t2v/posttrain_t2v_dpo.sh.

    torchrun --nproc_per_node 1 posttrain_sora_dpo.py ... --mm-data data_dpo.json \
        --mm-model posttrain_t2v_model.json --mm-tool tools.json --load <converted DiT>
"""

import sys

from mindspeed_mm.cli import run
from mindspeed_mm.training import pretrain
from mindspeed_mm.training.dpo import build_dpo_model


def main(argv=None) -> int:
    pretrain(argv, entry="dpo", build_model=build_dpo_model)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
