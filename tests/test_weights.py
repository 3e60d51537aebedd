"""Starting weights: partial loads from foreign checkpoints, clear errors, no code run from files."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision

from fastft.engine import Trainer
from fastft.errors import WeightsError
from fastft.model import build_resnet18, imagenet_state_dict, load_matching, read_state_dict


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
    assert f"weights {path}: loaded 119 tensors" in out
    assert "skipped for a shape mismatch" in out and "layer4.1.bn2.running_var" in out


def test_a_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        read_state_dict(path)


def test_a_state_dict_that_matches_nothing_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(WeightsError, match="no tensor matches ResNet-18"):
        load_matching(build_resnet18(2), read_state_dict(path), str(path))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_unreadable_weights_are_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        read_state_dict(path)


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
