"""Pretraining entry point (t2v and i2v), launched by examples/stepvideo/{t2v,i2v}/pretrain_*.sh.

    torchrun --nproc_per_node 8 pretrain_sora.py --tensor-model-parallel-size 8 ... \
        --mm-data data_static_resolution.json --mm-model pretrain_t2v_model.json --mm-tool tools.json
"""

import sys

from mindspeed_mm.cli import run
from mindspeed_mm.training import pretrain


def main(argv=None) -> int:
    pretrain(argv)  # the pretraining TrainSpec (t2v and i2v)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
