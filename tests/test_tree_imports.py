"""A bare checkout imports fastft_kernels (the lent GPU machine has no index, so nothing is installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastft import tree_imports

ROOT = Path(__file__).resolve().parents[1]

# Drop an installed (editable) mapping of fastft_kernels, so only the source tree can provide it.
BARE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
import fastft, fastft_kernels, fastft_kernels._resized_crop_triton as triton_part
print(fastft_kernels.__file__)
print(triton_part.__file__)
print(sum(isinstance(f, fastft.tree_imports.KernelsFinder) for f in sys.meta_path))
"""


def test_bare_tree_imports_kernels_from_its_kernels_folder(tmp_path):
    result = subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    init, triton_part, finders = result.stdout.split()
    assert Path(init) == ROOT / "kernels" / "__init__.py"
    assert Path(triton_part) == ROOT / "kernels" / "_resized_crop_triton.py"
    assert finders == "1"


def test_finder_answers_only_for_fastft_kernels_and_installs_once():
    finder = tree_imports.KernelsFinder()
    assert finder.find_spec("kernels") is None and finder.find_spec("fastft") is None
    spec = finder.find_spec("fastft_kernels")
    assert spec.name == "fastft_kernels" and spec.submodule_search_locations == [str(ROOT / "kernels")]
    tree_imports.install()
    tree_imports.install()
    assert sum(isinstance(f, tree_imports.KernelsFinder) for f in sys.meta_path) == 1
