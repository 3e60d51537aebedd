"""Starting weights for any model: a file matched against the chosen model, another model's file
named in one line, timm's files, a ViT's position embedding resized, ImageNet offline."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import interpolate_embeddings

from fastft.errors import WeightsError
from fastft.model import load_matching, read_weights, source_weights
from fastft.models import ModelSpec, Preprocessing, get_spec
from fastft.models.matching import model_target
from fastft.models.vit import ViTFamily

timm = pytest.importorskip("timm")


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """A torchvision model's state_dict on the meta device: names and shapes, a few kB saved."""
    with torch.device("meta"):
        return torchvision.models.get_model(name).state_dict()


def varied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state_dict with BN statistics unlike a fresh model's, so a load is visible."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def test_another_models_file_is_named_with_the_model_to_pass(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"state_dict": meta_state("resnet50")}, path)
    with pytest.raises(WeightsError) as info:
        read_weights(path, get_spec("resnet18"), 224)
    assert str(info.value) == (f"{path}: only 77 of resnet18's 100 backbone tensors match; this file is a "
                               "resnet50 checkpoint (all 265 tensors match): pass --model resnet50")


def test_a_shallower_relative_is_not_taken_for_the_file(tmp_path):
    """ResNet-101's file holds every name and shape of ResNet-50 (and 255 tensors more): the model
    that uses all of the file is named, not the first that finds all its own tensors there."""
    path = tmp_path / "r101.pt"
    torch.save(meta_state("resnet101"), path)
    with pytest.raises(WeightsError, match=r"this file is a resnet101 checkpoint \(all 520 tensors match\): "
                                           r"pass --model resnet101$"):
        read_weights(path, get_spec("resnet18"), 224)


def test_a_file_of_no_known_model_names_what_did_not_match(tmp_path):
    state = meta_state("resnet18")
    kept = {k: v for k, v in state.items() if not k.startswith("layer4.")}  # a cut-short file
    path = tmp_path / "partial.pt"
    torch.save({"state_dict": kept}, path)
    with pytest.raises(WeightsError) as info:
        read_weights(path)
    message = str(info.value)
    assert "\n" not in message and "this file is" not in message
    assert message.startswith(f"{path}: only 75 of resnet18's 100 backbone tensors match by name and shape "
                              "in ['state_dict'] (at least 90 needed")
    assert message.endswith("missing 25: layer4.0.conv1.weight, layer4.0.bn1.weight, layer4.0.bn1.bias, "
                            "layer4.0.bn1.running_mean, ...")


@pytest.mark.parametrize("layout, where", [
    (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "key prefix 'module.' removed"),
    (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, "key prefix '_orig_mod.' removed"),
    (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 9},
     "state_dict at ['state_dict']; key prefix 'model.' removed"),   # Lightning's
])
def test_a_wrapped_torchvision_file_of_another_family_loads_its_whole_backbone(tmp_path, layout, where):
    spec = get_spec("mobilenet_v3_small")
    state = varied(spec.build(spec.imagenet_classes()))
    path = tmp_path / "mobilenet.ckpt"
    torch.save(layout(state), path)
    loaded, label = read_weights(path, spec, 224)
    assert label == f"{path} ({where})"
    model = spec.build(2)
    head = spec.structure(model).head_path
    report = load_matching(model, loaded, label, head)
    assert head == "classifier.3" and sorted(report.mismatched) == [
        "classifier.3.bias (1000 vs 2)", "classifier.3.weight (1000x1024 vs 2x1024)"]
    assert len(report.loaded) == len(state) - 2 and report.missing == [] and report.unexpected == []
    own = model.state_dict()
    assert all(torch.equal(own[name], state[name]) for name in report.loaded)
    assert "classifier.0.weight" in report.loaded  # the Linear before the head is backbone, and loads


def test_a_timm_file_saved_by_timm_loads_fully_into_its_timm_model(tmp_path):
    spec = get_spec("timm:test_efficientnet")
    saved = timm.create_model("test_efficientnet")
    state = varied(saved)
    # Where huggingface_hub caches timm's files: the path names the model.
    folder = tmp_path / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / "0123abc"
    timm.models.save_for_hf(saved, str(folder), safe_serialization=True)
    path = folder / "model.safetensors"
    loaded, label = read_weights(path, spec, 160)
    assert label == str(path)
    model = spec.build(2, 160)
    report = load_matching(model, loaded, label, spec.structure(model).head_path)
    assert len(report.loaded) == len(state) - 2 and report.missing == [] and report.unexpected == []
    assert sorted(report.mismatched) == ["classifier.bias (1000 vs 2)", "classifier.weight (1000x256 vs 2x256)"]
    own = model.state_dict()
    assert all(torch.equal(own[name], state[name]) for name in report.loaded)
    with pytest.raises(WeightsError) as info:  # the same file, the wrong --model
        read_weights(path, get_spec("resnet18"), 160)
    assert str(info.value).endswith("this file is a timm:test_efficientnet checkpoint (all 73 tensors match): "
                                    "pass --model timm:test_efficientnet")


def test_a_timm_sibling_of_the_chosen_model_is_named_without_help_from_the_path(tmp_path):
    with torch.device("meta"):
        state = timm.create_model("resnet18d").state_dict()  # ResNet-D: a 3-conv stem (conv1.0, .1, .3)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        read_weights(path, get_spec("resnet18"), 224)
    assert str(info.value) == (f"{path}: only 84 of resnet18's 100 backbone tensors match; this file is a "
                               "timm:resnet18d checkpoint (all 110 tensors match): pass --model timm:resnet18d")


class TinyViT(ModelSpec):
    """torchvision's VisionTransformer at 2 layers, 64 wide: vit_b_16's code at a test's size."""

    def build(self, num_classes, image_size=None):
        return VisionTransformer(image_size or 224, 16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                                 num_classes=num_classes)

    def preprocessing(self):
        return Preprocessing()

    def imagenet_classes(self):
        return 1000


def test_a_vit_file_at_224_px_loads_into_a_32_px_model_with_its_position_embedding_resized(tmp_path):
    spec = TinyViT("tiny_vit", ViTFamily())
    torch.manual_seed(0)
    state = spec.build(1000, 224).state_dict()
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    loaded, label = read_weights(path, spec, 32)
    assert label == f"{path} (encoder.pos_embedding resized 1x197x64 -> 1x5x64 for 32 px)"
    model = spec.build(2, 32)
    report = load_matching(model, loaded, label, spec.structure(model).head_path)
    assert report.mismatched == ["heads.head.weight (1000x64 vs 2x64)", "heads.head.bias (1000 vs 2)"]
    assert len(report.loaded) == len(state) - 2 and report.missing == []
    expected = interpolate_embeddings(32, 16, dict(state))["encoder.pos_embedding"]
    assert torch.equal(model.encoder.pos_embedding, expected)
    assert torch.equal(model.encoder.layers[1].mlp[0].weight, state["encoder.layers.encoder_layer_1.mlp.0.weight"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_vit_b_16s_imagenet_weights_at_32_px_say_they_were_resized(monkeypatch):
    state = meta_state("vit_b_16")  # shapes only, but for the one tensor that is resized
    state["encoder.pos_embedding"] = torch.randn(1, 197, 768)
    monkeypatch.setattr(ModelSpec, "imagenet_state_dict", lambda self: dict(state))
    loaded, label = source_weights("imagenet", get_spec("vit_b_16"), 32)
    assert label == "imagenet (encoder.pos_embedding resized 1x197x768 -> 1x5x768 for 32 px)"
    assert torch.equal(loaded["encoder.pos_embedding"],
                       interpolate_embeddings(32, 16, dict(state))["encoder.pos_embedding"])
    assert source_weights("imagenet", get_spec("vit_b_16"), 224)[1] == "imagenet"  # its own size: as it is


def test_a_timm_vit_file_is_resized_by_timms_own_filter(tmp_path):
    spec = get_spec("timm:test_vit")
    torch.manual_seed(0)
    state = timm.create_model("test_vit").state_dict()  # 160 px: a 10x10 grid and a class token
    path = tmp_path / "test_vit.pth"
    torch.save({"state_dict_ema": state}, path)
    loaded, label = read_weights(path, spec, 64)
    old, new = "x".join(map(str, state["pos_embed"].shape)), "x".join(map(str, loaded["pos_embed"].shape))
    assert label == f"{path} (state_dict at ['state_dict_ema']; pos_embed resized {old} -> {new} for 64 px)"
    model = spec.build(2, 64)
    report = load_matching(model, loaded, label, spec.structure(model).head_path)
    assert len(report.loaded) == len(state) - 2 and report.missing == [] and report.unexpected == []
    assert torch.equal(model.pos_embed, loaded["pos_embed"]) and new != old


def test_imagenet_offline_names_the_chosen_models_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        source_weights("imagenet", get_spec("mobilenet_v3_small"), 224)
    message = info.value.one_line()
    assert message == str(info.value)
    assert "mobilenet_v3_small-047dcff4.pth" in message and os.environ["TORCH_HOME"] in message
    assert "Temporary failure in name resolution" in message and "--weights PATH" in message


def test_regnet_shapes_come_from_the_meta_device_too():
    """RegNet's builder computes its widths with tensors (.tolist()), which torch.device("meta") refuses."""
    target = model_target(get_spec("regnet_y_400mf"))
    real = torchvision.models.regnet_y_400mf().state_dict()
    assert target.shapes == {name: t.shape for name, t in real.items()}
    assert target.head_path == "fc" and len(target.backbone) == len(real) - 2 - sum(
        name.endswith("num_batches_tracked") for name in real)
    assert all(p.device.type == "meta" for p in target.model.parameters())
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"  # put back
