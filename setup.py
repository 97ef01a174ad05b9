"""Installs the ``spikegpt`` package; ``kernels/`` (the Triton kernels) installs as ``spikegpt.kernels``."""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = next(line.split('"')[1] for line in (here / "spikegpt" / "version.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="spikegpt",
    version=version,
    description="Train, evaluate and sample spiking RWKV language models (SpikeGPT) in PyTorch",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["spikegpt", "spikegpt.data", "spikegpt.spikify", "spikegpt.classify", "spikegpt.cpu", "spikegpt.kernels"],
    package_data={"spikegpt.cpu": ["ops.cpp", "decode.cpp", "mul_add.h"]},
    package_dir={"spikegpt": "spikegpt", "spikegpt.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "ninja>=1.10",  # builds the fused CPU ops (spikegpt/cpu) with torch's extension tooling
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "zstandard>=0.21", "lm-eval>=0.4.13", "matplotlib>=3.5"],
        "wandb": ["wandb>=0.16"],
        "plot": ["matplotlib>=3.5"],
        "zstd": ["zstandard>=0.21"],
        "eval": ["lm-eval>=0.4.13"],
    },
    entry_points={"console_scripts": [
        "spikegpt-train=spikegpt.train:main",
        "spikegpt-generate=spikegpt.generate:main",
        "spikegpt-harness=spikegpt.harness:main",
    ]},
)
