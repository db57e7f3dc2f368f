"""accel_distill: few-step distillation and finetuning of video diffusion models on accelerate + diffusers."""

from setuptools import find_packages, setup

setup(
    name="accel_distill",
    version="0.1.0",
    description="Distill and finetune video diffusion models (Wan) into few-step students with accelerate + diffusers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["accel_distill", "accel_distill.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the Makefile (the CPU build on these machines);
        # a range keeps pip from replacing it with a multi-GB CUDA build.
        "torch>=2.4",
        "accelerate>=1.10",
        "diffusers>=0.42",
        "transformers>=4.50",
        "peft>=0.15",
        "safetensors>=0.4",
        "datasets>=3.0",
        "pyarrow>=15",
        "wandb>=0.19",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tokenizers>=0.20",
        # preprocessing (accel_distill.preprocess): video decoding (wheels bundle ffmpeg), images
        "av>=12",
        "pillow>=9",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "scikit-learn>=1.3", "tensorboard>=2.14"],
        "demo": ["scikit-learn>=1.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "accel-distill-train=accel_distill.cli:main",
            "accel-distill-preprocess=accel_distill.preprocess.cli:main",
            "accel-distill-generate=accel_distill.generate.cli:main",
        ]
    },
)
