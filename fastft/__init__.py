"""fastft: fine-tune ResNet-18 the d2l.ai way (chapter 13.2), only fast.

The path of one batch: cli -> config -> data -> model/strategy -> engine -> report.
"""

from . import tree_imports

__version__ = "0.1.0"

# A bare checkout (PYTHONPATH at the tree, nothing installed) still imports fastft_kernels.
tree_imports.install()
