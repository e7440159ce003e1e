"""Memory planner: the peak device memory per rank of a StepVideo training step, and the layouts that fit; with
--inference, of sampling (`plan_sampling`).

    python -m mindspeed_mm.tools.memory_plan --mm-model ... --mm-data ... --tensor-model-parallel-size 8 ...

The model is arithmetic (`dit.py`, `encoders.py`, `plan.py`; no torch); `cli.py` reads the launchers' flags and
JSON files. docs/performance.md ("Memory planner") has the formulas and the validation against measured peaks.
"""

from .dit import DiTShape, Recompute, TokenSplit, Workload, block_activations, dit_parameters
from .encoders import BertShape, StepLLMShape, VAEShape
from .plan import (GIB, Fit, Layout, MemoryPlan, RawVideo, Sampling, SamplingPlan, Training, fitting_layouts,
                   layout_problems, plan_memory, plan_sampling)

__all__ = ["BertShape", "DiTShape", "Fit", "GIB", "Layout", "MemoryPlan", "RawVideo", "Recompute", "Sampling",
           "SamplingPlan", "StepLLMShape",
           "TokenSplit", "Training", "VAEShape", "Workload", "block_activations", "dit_parameters", "fitting_layouts",
           "layout_problems", "plan_memory", "plan_sampling"]
