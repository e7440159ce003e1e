"""python -m mindspeed_mm.tools.memory_plan: see cli.py."""

import sys

from mindspeed_mm.cli import run
from mindspeed_mm.tools.memory_plan.cli import main

sys.exit(run(main))
