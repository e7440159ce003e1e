"""DPO post-training entry point (Dpo训练), launched by examples/stepvideo/t2v/posttrain_t2v_dpo.sh.

    torchrun --nproc_per_node 8 posttrain_dpo.py ... --mm-data data_dpo.json \
        --mm-model posttrain_t2v_model.json --mm-tool tools.json --load <converted DiT> --save <dir>

`posttrain_sora_dpo.py` (MindSpeed-MM's later launcher) and `posttrain_stepvideo_dpo.py` (the user guide's) run this.
See docs/dpo.md.
"""

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from mindspeed_mm.training import pretrain
    from mindspeed_mm.training.spec import DPO

    pretrain(argv, DPO)
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
