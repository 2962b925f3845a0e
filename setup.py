"""mixfast: fast, faithful self-supervised pretraining with image mixtures and masks."""

from setuptools import find_packages, setup

setup(
    name="mixfast",
    version="0.1.0",
    description="MixMask / Un-Mix self-supervised pretraining on DeepSpeed, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mixfast", "mixfast.*"]),
    install_requires=[
        "torch>=2.4",
        # torchvision has no CPU wheel for recent torch; mixfast/_compat.py makes the CUDA
        # wheel importable on CPU-only torch. --no-deps in the Makefile keeps pip from
        # replacing the CPU torch with the CUDA one.
        "torchvision",
        "pydantic>=2.6",
        "numpy",
        "pillow",
        "scikit-learn",  # the built-in demo data set (load_digits' file ships inside it)
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        "dev": ["pytest>=8", "deepspeed>=0.16"],
        "triton": ["triton>=3.0"],
        "dali": ["nvidia-dali-cuda120"],
    },
    entry_points={"console_scripts": ["mixfast-train=mixfast.train:main"]},
)
