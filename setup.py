from setuptools import find_packages, setup

setup(
    name="fastft",
    version="0.1.0",
    description="High-throughput fine-tuning of torchvision and timm classifiers, the d2l.ai hotdog chapter done fast",
    # The top-level kernels/ folder installs as fastft_kernels: PyPI has an unrelated "kernels".
    packages=find_packages(include=["fastft", "fastft.*"]) + ["fastft_kernels"],
    package_dir={"fastft_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "tqdm", "pillow"],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dali-cu13": ["nvidia-dali-cuda130"],
        # After training (each imported only by the command that needs it, with this hint when missing):
        "plot": ["matplotlib"],                            # curves.png, fastft plot, eval's PNGs
        "safetensors": ["safetensors"],                    # model.safetensors, --weights *.safetensors
        "onnx": ["onnx", "onnxscript", "onnxruntime"],     # fastft export --format onnx, predict --model
        "tensorboard": ["tensorboard"],                    # fastft train --tensorboard
        "timm": ["timm>=1.0"],                             # --model timm:NAME (timm's model zoo)
        # The cached loader's batched nvJPEG decode, and AVIF/HEIC where Pillow lacks them; needs
        # torch >= 2.11 (without it, or where it does not load, torchvision's decoders are used).
        "torchcodec": ["torchcodec>=0.16"],
        # Tests run the DALI pipelines with CPU operators, so CI installs DALI where wheels exist,
        # and every optional package above, so the tests of what they serve run rather than skip.
        "test": ["pytest", "pytest-benchmark", "safetensors", "matplotlib", "onnx", "onnxscript",
                 "onnxruntime", "tensorboard", "torchcodec>=0.16", "timm>=1.0",
                 "nvidia-dali-cuda120; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["fastft=fastft.cli:main"]},
)
