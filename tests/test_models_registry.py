"""The model registry: names, families, structures, preprocessing, `fastft models`, and timm's
install hint. Per-family exactness of the fast paths is in test_model_families.py."""

from __future__ import annotations

import builtins

import pytest
import torch

from fastft.cli import main
from fastft.errors import ConfigError
from fastft.models import get_spec
from fastft.models.listing import detail_lines

# name -> (family, units incl. the stem, head path, feature width)
EXPECTED = {
    "resnet18": ("resnet", 5, "fc", 512),
    "resnet50": ("resnet", 5, "fc", 2048),
    "efficientnet_b0": ("efficientnet/mobilenet", 8, "classifier.1", 1280),
    "mobilenet_v3_large": ("efficientnet/mobilenet", 7, "classifier.3", 1280),
    "convnext_tiny": ("convnext", 5, "classifier.2", 768),
    "vit_b_16": ("vit", 5, "heads.head", 768),
    "densenet121": ("generic", 1, "classifier", 1024),
    "timm:test_efficientnet": ("timm", 6, "classifier", 256),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_each_family_describes_its_model(name):
    family, units, head, width = EXPECTED[name]
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.build(3, 32 if not name.startswith("timm") else 64)
    structure = spec.structure(model)
    assert (spec.family.name, len(structure.units), structure.head_path, structure.feature_dim) == (
        family, units, head, width)
    assert structure.head is model.get_submodule(head) and structure.head.out_features == 3
    # Every parameter belongs to exactly one of: a unit, the tail, the head.
    owners = [p for u in structure.units for p in u.parameters()]
    owners += [p for m in structure.tail for p in m.parameters()] + list(structure.head.parameters())
    assert sorted(map(id, owners)) == sorted(map(id, model.parameters()))


def test_the_preprocessing_comes_from_the_weights():
    assert get_spec("resnet18").preprocessing().to_dict() == {
        "image_size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear"}
    eff = get_spec("efficientnet_b0").preprocessing()
    assert (eff.resize, eff.interpolation) == (256, "bicubic")
    assert get_spec("convnext_tiny").preprocessing().resize == 236
    vit = get_spec("timm:test_vit").preprocessing()
    assert (vit.image_size, vit.resize, vit.mean, vit.interpolation) == (160, 168, (0.5, 0.5, 0.5), "bicubic")
    assert get_spec("resnet50").preprocessing().at_size(112).resize == 116  # 232/224 kept


@pytest.mark.parametrize("name, message", [
    ("resnet19", "--model resnet19: not a torchvision classifier; did you mean resnet18?"),
    ("timm:no_such_net", "--model timm:no_such_net: timm has no such model"),
])
def test_an_unknown_name_is_one_line(name, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        get_spec(name)


def test_without_timm_the_line_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match=r"--model timm:resnet18d needs timm: pip install timm "
                                          r"\(or pip install 'fastft\[timm\]'\)"):
        get_spec("timm:resnet18d")


def test_a_vit_size_must_be_whole_patches():
    with pytest.raises(ConfigError, match="a ViT with 16 px patches takes multiples of 16 px; use --image-size 32 or 48"):
        get_spec("vit_b_16").build(2, 40)


def test_fastft_models_lists_and_details(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet50            resnet                  full" in out
    assert "densenet121         generic                 frozen backbone only" in out
    assert "timm:NAME" in out
    lines = detail_lines("vit_b_16")
    assert lines[0] == "vit_b_16: family vit, fast paths full"
    assert any("unit 4: blocks 9-11" in line and "partial:4" in line for line in lines)
    assert lines[-1].endswith("partial:0..4")
