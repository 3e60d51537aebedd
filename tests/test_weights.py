"""Starting weights: partial loads from foreign checkpoints, clear errors, no code run from files."""

from __future__ import annotations

import argparse
import os
import urllib.error

import pytest
import torch
import torchvision

from fastft.engine import Trainer
from fastft.errors import WeightsError
from fastft.model import build_resnet18, imagenet_state_dict, load_matching, read_state_dict, read_weights


def foreign_checkpoint(imagenet_like, tmp_path):
    """A DDP+compile style file: prefixed names, a 1000-way fc, one tensor missing, one extra."""
    state = torch.load(imagenet_like, weights_only=True)
    del state["layer4.1.bn2.running_var"]
    state["projection.weight"] = torch.zeros(3, 3)
    wrapped = {(f"_orig_mod.module.{k}" if k.startswith("layer") else f"module.{k}"): v for k, v in state.items()}
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": wrapped, "epoch": 7}, path)
    return path, state


def test_partial_load_matches_names_and_shapes_and_reports_the_rest(imagenet_like, tmp_path):
    path, state = foreign_checkpoint(imagenet_like, tmp_path)
    model = build_resnet18(2)
    init_var = model.layer4[1].bn2.running_var.clone()
    report = load_matching(model, read_state_dict(path), str(path))
    assert sorted(report.mismatched) == ["fc.bias (1000 vs 2)", "fc.weight (1000x512 vs 2x512)"]
    assert report.missing == ["layer4.1.bn2.running_var"]
    assert report.unexpected == ["projection.weight"]
    assert len(report.loaded) == len(model.state_dict()) - 3
    own = model.state_dict()
    assert all(torch.equal(own[name], state[name]) for name in report.loaded)
    assert torch.equal(model.layer4[1].bn2.running_var, init_var)
    text = "\n".join(report.lines())
    assert "loaded 119 tensors" in text and "fc.weight (1000x512 vs 2x512)" in text


def test_the_trainer_prints_the_load_report(make_cfg, imagenet_like, tmp_path, capsys):
    path, _ = foreign_checkpoint(imagenet_like, tmp_path)
    Trainer(make_cfg(weights=str(path))).setup()
    out = capsys.readouterr().out
    assert (f"weights {path} (state_dict at ['state_dict']; key prefix '_orig_mod.module.', 'module.' "
            f"removed): loaded 119 tensors") in out
    assert "skipped for a shape mismatch" in out and "layer4.1.bn2.running_var" in out


def test_a_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        read_state_dict(path)


def test_a_state_dict_that_matches_nothing_is_a_clear_error():
    with pytest.raises(WeightsError, match="no tensor matches the ResNet model by name and shape"):
        load_matching(build_resnet18(2), {"encoder.weight": torch.zeros(4, 4)}, "imagenet")


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"not a checkpoint at all", "not a PyTorch weights file (torch.save zip or a .safetensors file expected)"),
    (b"PK\x03\x04truncated zip", "truncated or corrupt zip archive (")])
def test_unreadable_weights_are_a_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as caught:
        read_state_dict(path)
    assert str(caught.value).startswith(f"{path}: {reason}") and "\n" not in str(caught.value)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": RunsCode(str(marker))}, path)
    with pytest.raises(WeightsError):
        read_state_dict(path)
    assert not marker.exists()


def test_imagenet_weights_offline_say_which_file_to_place(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        imagenet_state_dict()
    message = info.value.one_line()
    assert "resnet18-f37072fd.pth" in message and os.environ["TORCH_HOME"] in message
    assert "--weights PATH" in message and "\n" not in str(info.value)


def test_imagenet_weights_come_from_the_hub_cache(imagenet_like):
    cache = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints")
    os.makedirs(cache, exist_ok=True)
    os.link(imagenet_like, os.path.join(cache, "resnet18-f37072fd.pth"))
    state = imagenet_state_dict()
    assert torch.equal(state["fc.weight"], torch.load(imagenet_like, weights_only=True)["fc.weight"])
    model = torchvision.models.resnet18()
    model.load_state_dict(state)


def lightning_checkpoint(state, path):
    """What a LightningModule holding the network as `self.model` saves: prefixed keys, extras."""
    wrapped = {f"model.{name}": tensor for name, tensor in state.items()}
    wrapped["criterion.weight"] = torch.ones(2)  # another submodule of the LightningModule
    torch.save({"state_dict": wrapped, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.5.0",
                "hyper_parameters": {"lr": 0.01}, "optimizer_states": [], "loops": {"fit_loop": {}}}, path)


def test_a_lightning_checkpoint_loads_the_backbone_and_says_where_it_was(imagenet_like, tmp_path):
    state = torch.load(imagenet_like, weights_only=True)
    path = tmp_path / "last.ckpt"
    lightning_checkpoint(state, path)
    loaded, label = read_weights(path)
    assert label == f"{path} (state_dict at ['state_dict']; key prefix 'model.' removed)"
    model = build_resnet18(2)
    report = load_matching(model, loaded, label)
    # 122 entries (20 of them BN num_batches_tracked) less the 1000-way fc: all 120 load.
    assert len(state) == 122 and len(report.loaded) == 120
    assert sorted(report.mismatched) == ["fc.bias (1000 vs 2)", "fc.weight (1000x512 vs 2x512)"]
    assert report.missing == [] and report.unexpected == ["criterion.weight"]
    own = model.state_dict()
    assert all(torch.equal(own[name], state[name]) for name in report.loaded)
    assert report.lines()[0] == f"weights {label}: loaded 120 tensors"


@pytest.mark.parametrize("layout, where", [
    (lambda sd: {"model": {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}}},
     "state_dict at ['model']['state_dict']; key prefix 'module.backbone.' removed"),
    (lambda sd: {"ema": sd, "step": 5}, "state_dict at ['ema']"),
    # timm writes both; like timm's own loader, fastft takes the EMA copy.
    (lambda sd: {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd},
     "state_dict at ['state_dict_ema']"),
    (lambda sd: {"encoder.model.module._orig_mod." + k: v for k, v in sd.items()},
     "key prefix 'encoder.model.module._orig_mod.' removed"),
    (lambda sd: {"model": sd, "config": {"lr": 0.1}, "optimizer": {"state": {}, "param_groups": []}},
     "state_dict at ['model']"),  # a fastft checkpoint
])
def test_containers_and_prefixes_are_found_by_matching_the_model(imagenet_like, tmp_path, layout, where):
    state = torch.load(imagenet_like, weights_only=True)
    path = tmp_path / "weights.pt"
    torch.save(layout(state), path)
    loaded, label = read_weights(path)
    assert label == f"{path} ({where})"
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_non_tensor_entries_are_ignored_not_a_reason_to_refuse(imagenet_like, tmp_path):
    state = torch.load(imagenet_like, weights_only=True)
    odd = {k: (int(v) if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    odd["_metadata"] = {"": {"version": 1}}
    path = tmp_path / "odd.pt"
    torch.save(odd, path)
    report = load_matching(build_resnet18(2), read_state_dict(path), str(path))
    assert len(report.loaded) == 100 and len(report.missing) == 20
    assert report.lines()[2] == "  missing from the file (kept at init): 20 BatchNorm num_batches_tracked counters"


def test_too_few_backbone_matches_is_a_one_line_error_naming_unmatched_keys(tmp_path):
    with torch.device("meta"):  # shapes only: the file stays a few kB
        other = torchvision.models.resnet18(num_classes=10).state_dict()
    for name in [n for n in other if n.startswith("layer1.") and other[n].dim()]:  # a narrower first stage: a changed network
        other[name] = torch.empty(other[name].shape[0] // 2, *other[name].shape[1:], device="meta")
    path = tmp_path / "narrow.pt"
    torch.save({"state_dict": other}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: only 80 of resnet18's 100 backbone tensors match by name and shape "
                              "in ['state_dict'] (at least 90 needed")
    assert "unmatched keys: layer1.0.conv1.weight (32x64x3x3 vs 64x64x3x3), layer1.0.bn1.weight (32 vs 64)" in message


def refusal(path, what):
    return (f"{path}: holds {what}; fastft reads weights with torch.load(weights_only=True) so that no code "
            "from the file runs, and rebuilding that object would run it. Re-save the weights on the "
            "machine that made it: torch.save(model.state_dict(), PATH)")


def test_a_whole_pickled_model_is_a_plain_line_with_the_fix(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert str(info.value) == refusal(
        path, "a pickled model object (torchvision.models.resnet.ResNet), not a state_dict")
    assert "\x1b" not in str(info.value)


def test_any_refused_global_is_named_in_a_plain_line(imagenet_like, tmp_path):
    path = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert str(info.value) == refusal(path, "a pickled reference to argparse.Namespace, not only tensors")


class Tripwire(torch.nn.Linear):
    """A model whose unpickling leaves a folder behind: proof of whether the file's code ran."""

    def __setstate__(self, state):
        os.mkdir(state["marker"])
        super().__setstate__(state)


def test_a_pickled_model_never_runs_its_code(tmp_path):
    marker = tmp_path / "ran"
    model = Tripwire(2, 2)
    model.marker = str(marker)
    path = tmp_path / "tripwire.pt"
    torch.save(model, path)
    with pytest.raises(WeightsError, match=r"holds a pickled model object \(.*Tripwire\), not a state_dict"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what fastft refuses to do: the file's code runs
    assert marker.exists()
