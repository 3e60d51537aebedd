"""``import fastft_kernels`` from a bare source tree, where setup.py's mapping was never installed.

setup.py installs the top-level ``kernels/`` folder under the import name ``fastft_kernels``
(``package_dir``). A checkout run with ``PYTHONPATH`` at its root (the lent GPU machine: no
package index, so no ``pip install``) has only ``kernels/``, and ``import fastft_kernels`` would
fail. ``fastft`` appends this finder to ``sys.meta_path`` when it is imported: the import system
asks it last, so an installed ``fastft_kernels`` always wins, and the name stays the only one the
kernels are ever imported under (never ``kernels``, which is another project on PyPI).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

NAME = "fastft_kernels"
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


class KernelsFinder(importlib.abc.MetaPathFinder):
    """Maps the package ``fastft_kernels`` to ``<tree>/kernels`` (its submodules follow from there)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        init = KERNELS_DIR / "__init__.py"
        if fullname != NAME or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(NAME, init, submodule_search_locations=[str(KERNELS_DIR)])


def install() -> None:
    """Append one KernelsFinder to ``sys.meta_path``; calling it again adds none."""
    if not any(isinstance(finder, KernelsFinder) for finder in sys.meta_path):
        sys.meta_path.append(KernelsFinder())
