"""The DPO entry point under the name MindSpeed-MM's later launchers use: posttrain_dpo.py's main."""

import sys

from mindspeed_mm.cli import run
from posttrain_dpo import main

if __name__ == "__main__":
    sys.exit(run(main))
