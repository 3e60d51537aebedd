"""fastft's fused data kernels, installed under the import name ``fastft_kernels``.

The code lives in the repository's top-level ``kernels/`` folder, but setup.py maps that folder to
the package name ``fastft_kernels`` (``package_dir={"fastft_kernels": "kernels"}``). A different
project on PyPI is called ``kernels``; importing ``fastft_kernels`` can never resolve to it, while
``import kernels`` could, depending on what else is installed and on the current directory.
Always import this package as ``fastft_kernels``.

Triton is imported lazily, only when the Triton launcher runs, so CPU-only installs without
Triton import this package and use the pure-torch reference.
"""

from .resized_crop import (
    PackedImages,
    resized_crop_normalize,
    resized_crop_normalize_reference,
    resized_crop_normalize_triton,
)

__all__ = [
    "PackedImages",
    "resized_crop_normalize",
    "resized_crop_normalize_reference",
    "resized_crop_normalize_triton",
]
