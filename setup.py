"""fastdarts: a fast DARTS for PyTorch.

``kernels/`` installs as ``fastdarts.kernels``. torch is not pinned: GPU machines run
torch 2.11 with triton 3.6, CPU machines 2.14 with triton 3.8.
"""

from setuptools import find_packages, setup

setup(
    name="fastdarts",
    version="0.1.0",
    description="Fast DARTS (differentiable architecture search) for PyTorch",
    packages=[*find_packages(include=["fastdarts", "fastdarts.*"]), "fastdarts.kernels"],
    package_dir={"fastdarts.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "cifar": ["torchvision"],
        "test": ["pytest", "ruff", "torchvision"],
    },
)
