"""Every network fastft trains: one file per family, and the registry that names them.

    from fastft.models import get_spec
    spec = get_spec("convnext_tiny")
    model = spec.build(num_classes=2)
    structure = spec.structure(model)

See base.py for the three records (Preprocessing, Structure, Family) and registry.py for names.
"""

from fastft.models.base import DEFAULT_PREPROCESSING, Preprocessing, Structure, Unit
from fastft.models.registry import DEFAULT_MODEL, ModelSpec, describe, get_spec, torchvision_classifiers

__all__ = ["DEFAULT_MODEL", "DEFAULT_PREPROCESSING", "ModelSpec", "Preprocessing", "Structure", "Unit", "describe",
           "get_spec", "torchvision_classifiers"]
