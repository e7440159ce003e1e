"""mindspeed_mm: StepVideo training and inference on Megatron-core (NPU, GPU and CPU)."""

__version__ = "0.1.0"
