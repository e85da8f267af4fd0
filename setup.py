"""megatron_uni: megatron-core pretraining stack for LLaDA2.0-Uni.

CPU machines: install torch first with ``pip install torch==2.13.0`` (a CPU wheel), otherwise pip
resolves ``torch`` to a multi-GB CUDA build. NVIDIA apex is deliberately not a dependency (see
README: it is not on PyPI, and a half-installed apex breaks megatron-core's fallbacks).
"""

from setuptools import find_packages, setup

setup(
    name="megatron_uni",
    version="0.1.0",
    description="Megatron-core pretraining stack for the LLaDA2.0-Uni masked-diffusion MoE",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_uni", "megatron_uni.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "psutil",  # without it megatron's dist_checkpointing.save hangs forever
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch,core-cu13]>=2.9"],  # GPU clusters only
        "dali": ["nvidia-dali-cuda130>=2.0"],
        "mpi": ["mpi4py>=4.1", "mpich>=4"],
        # matplotlib: tools/plot_logs.py; diffusers: the LLaDA2Pipeline comparison of the sampler
        "test": ["pytest>=8", "pytest-timeout", "matplotlib", "diffusers>=0.42"],
    },
    entry_points={"console_scripts": ["megatron-uni=megatron_uni.cli:main"]},
)
