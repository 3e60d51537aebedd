"""fastft: fine-tune ResNet-18 the d2l.ai way (chapter 13.2), only fast.

The path of one batch: cli -> config -> data -> model/strategy -> engine -> report.
"""

__version__ = "0.1.0"
