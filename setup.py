from setuptools import find_packages, setup

setup(
    name="fastft",
    version="0.1.0",
    description="High-throughput fine-tuning of ResNet-18, the d2l.ai hotdog chapter done fast",
    packages=find_packages(include=["fastft", "fastft.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "tqdm", "pillow"],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dali-cu13": ["nvidia-dali-cuda130"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fastft=fastft.cli:main"]},
)
