"""mindspeed_mm: StepVideo training and inference on Megatron-core (Ascend NPU, NVIDIA GPU, CPU)."""

from setuptools import find_packages, setup

setup(
    name="mindspeed_mm",
    version="0.1.0",
    description="StepVideo (t2v/i2v) training, inference, conversion and DPO on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mindspeed_mm", "mindspeed_mm.*"]),
    package_data={"mindspeed_mm": ["tools/*.json"]},
    # Ranges, so an Ascend user keeps the torch that matches torch_npu (torch_npu 2.x needs the
    # same torch 2.x) and a GPU user keeps their CUDA build. requirements.txt pins the tested set.
    install_requires=[
        "torch>=2.1",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "transformers>=4.40",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "av>=11",
        "tqdm",
        "psutil",
        "einops",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.5", "peft>=0.17"],
        "npu": ["torch_npu"],
        "eval": ["vbench"],
        "decord": ["decord>=0.6"],
    },
)
