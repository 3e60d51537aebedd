"""`fastft models` and `fastft models NAME`: what can be trained, and how fastft sees one model.

    fastft models                      # every torchvision classifier, its family, its fast paths
    fastft models convnext_tiny        # its stem and stages (what partial:K freezes), head, input
    fastft models timm:convnext_atto
"""

from __future__ import annotations

from fastft.models.registry import FAMILIES, ModelSpec, get_spec, torchvision_classifiers
from fastft.models.timm_models import INSTALL_HINT, PREFIX


def fast_paths(spec: ModelSpec) -> str:
    """"full" where every fast path applies (a described forward: partial:K split, BN folded where
    a conv/BN pair exists), else what remains."""
    return "full" if spec.family.full_fast_paths else "frozen backbone only (no stages described)"


def list_lines() -> list[str]:
    """One line per torchvision classifier: name, family, fast paths; then timm's line."""
    rows = [(name, next(f for f in FAMILIES[1:] if f.matches(name)).name) for name in torchvision_classifiers()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model':<{width}}  {'family':<22}  fast paths", "-" * (width + 50)]
    for name, family in rows:
        full = "full" if family != "generic" else "frozen backbone only"
        lines.append(f"{name:<{width}}  {family:<22}  {full}")
    return lines + ["", _timm_line(), "`fastft models NAME` shows one model's stages, head and preprocessing."]


def _timm_line() -> str:
    try:
        import timm
    except ImportError:
        return f"{PREFIX}NAME: timm's models, once timm is installed: {INSTALL_HINT}"
    return (f"{PREFIX}NAME: any of timm {timm.__version__}'s {len(timm.list_models())} models "
            f"(timm.list_models() lists them); stages from timm's group_matcher, frozen backbone fast path")


def detail_lines(name: str) -> list[str]:
    """The stages, head, feature width, preprocessing and fast paths of one model (built on the
    meta device: no memory, no download). Raises ConfigError for an unknown name."""
    import torch
    spec = get_spec(name)
    pre = spec.preprocessing()
    with torch.device("meta"):
        model = spec.build(2, pre.image_size)
    structure = spec.structure(model)
    count = lambda params: sum(p.numel() for p in params) / 1e6  # noqa: E731
    lines = [f"{spec.name}: family {spec.family.name}, fast paths {fast_paths(spec)}",
             f"  input: {pre.image_size} px crop of a {pre.resize} px resize ({pre.interpolation}), "
             f"mean {list(pre.mean)}, std {list(pre.std)}",
             f"  head: {structure.head_path} (Linear {structure.feature_dim} -> classes); "
             f"pretrained head: {spec.imagenet_classes()} classes"]
    for i, unit in enumerate(structure.units):
        lines.append(f"  unit {i}: {unit.name:<14} {count(unit.parameters()):8.2f} M params   "
                     f"(partial:{i} freezes units 0..{i})")
    tail = [p for m in structure.tail for p in m.parameters()]
    lines.append(f"  tail: {count(tail):.2f} M params (trains unless the whole backbone is frozen)")
    lines.append(f"  strategies: finetune, frozen, probe, scratch, hotdog (needs a 1000-class pretrained head), "
                 f"partial:0..{structure.stages}")
    return lines
