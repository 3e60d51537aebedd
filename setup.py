from setuptools import find_packages, setup

setup(
    name="fastft",
    version="0.1.0",
    description="High-throughput fine-tuning of ResNet-18, the d2l.ai hotdog chapter done fast",
    # The top-level kernels/ folder installs as fastft_kernels: PyPI has an unrelated "kernels".
    packages=find_packages(include=["fastft", "fastft.*"]) + ["fastft_kernels"],
    package_dir={"fastft_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "tqdm", "pillow"],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dali-cu13": ["nvidia-dali-cuda130"],
        "plot": ["matplotlib"],
        # Tests run the DALI pipelines with CPU operators, so CI installs DALI where wheels exist.
        # safetensors: a test writes a .safetensors file for --weights, as other tools do.
        "test": ["pytest", "pytest-benchmark", "safetensors",
                 "nvidia-dali-cuda120; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["fastft=fastft.cli:main"]},
)
