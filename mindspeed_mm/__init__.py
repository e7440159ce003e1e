"""mindspeed_mm: StepVideo training and inference on Megatron-core (NPU, GPU and CPU)."""

import warnings

__version__ = "0.1.0"

# Megatron-core warns on import that Transformer Engine and Apex are absent. This project does not
# use either (see docs/install.md), so the warning is noise in every command's output.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
