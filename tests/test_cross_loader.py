"""The torch and DALI loaders agree on a folder of the inputs people bring: the same
files, class order and labels, and the same decoded pixels, sample by sample, on
the deterministic test pipeline.

The folder holds a test split without one train class, an empty test class folder,
hidden files and folders, a file with an unsupported extension, and images in
unusual modes: 16-bit grayscale PNG, CMYK JPEG, palette PNG with transparency and
an EXIF-rotated JPEG (orientation ignored by both, as ImageFolder ignores it).
Files DALI's decoder reads wrongly or not at all (32-bit integer, float, 1-bit
TIFFs) reach DALI as RGB PNG copies (layout.dali_files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastft.data.dali_loader import DaliLoaders  # noqa: E402
from fastft.data.layout import scan_dataset  # noqa: E402
from fastft.data.torch_loader import TorchLoaders  # noqa: E402
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fastft.runtime import Runtime  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
W, H = 40, 30


def _gradient(seed: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth ramps plus a bright block, so a resize or crop that
    differs by a pixel, or a rotation, moves many levels."""
    ys, xs = np.mgrid[0:H, 0:W]
    rgb = np.stack([xs * 6 + seed * 20, ys * 8, (xs + ys) * 3 + seed * 40], axis=-1) % 256
    rgb[5:12, 8 + seed: 20 + seed] = 250
    return rgb.astype(np.uint8)


def _odd_images(folder: Path, seed: int) -> None:
    """One image in each unusual mode under `folder`."""
    grey16 = (_gradient(seed)[..., 0].astype(np.uint16) * 257 + 100).astype("<u2")
    Image.frombytes("I;16", (W, H), grey16.tobytes()).save(folder / "deep.png")
    cmyk = np.concatenate([255 - _gradient(seed), _gradient(seed + 1)[..., :1] // 4], axis=-1)
    Image.frombytes("CMYK", (W, H), cmyk.tobytes()).save(folder / "print.jpg", quality=95)
    Image.fromarray(_gradient(seed)).quantize(16).save(folder / "logo.png", transparency=3)
    rotated = Image.fromarray(_gradient(seed + 2))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(folder / "phone.jpg", exif=exif, quality=95)


def _plain(folder: Path, n: int, seed: int) -> None:
    for i in range(n):
        Image.fromarray(_gradient(seed + i)).save(folder / f"{i}.jpg", quality=95)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """train/{a,b,c,d}; test/{a, b (empty but for a hidden file), d}: no test/c."""
    root = tmp_path_factory.mktemp("mixed") / "d"
    for split, names in (("train", "abcd"), ("test", "abd")):
        for k, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            if not (split == "test" and name == "b"):
                _plain(root / split / name, 2, seed=k)
    for split in ("train", "test"):
        _odd_images(root / split / "d", seed=5)
        (root / split / "d" / "notes.txt").write_text("not an image")
        (root / split / "d" / "anim.gif").write_bytes(b"GIF89a")
        (root / split / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / split / "a" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")
        (root / split / "a" / ".ipynb_checkpoints").mkdir()
        _plain(root / split / "a" / ".ipynb_checkpoints", 1, seed=9)
    (root / "test" / "b" / ".DS_Store").write_bytes(b"\x00")
    return root


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.float() * STD * 255 + MEAN * 255


def test_torch_and_dali_agree_sample_by_sample(mixed):
    layout = scan_dataset(mixed)
    assert layout.classes == ("a", "b", "c", "d") and layout.missing_in_test == ("b", "c")
    names = [(p.parent.name, p.name, label) for p, label in layout.files["test"]]
    assert names == [("a", "0.jpg", 0), ("a", "1.jpg", 0), ("d", "0.jpg", 3), ("d", "1.jpg", 3),
                     ("d", "deep.png", 3), ("d", "logo.png", 3), ("d", "phone.jpg", 3),
                     ("d", "print.jpg", 3)]
    assert not layout.dali_copies  # DALI's decoder reads every one of these as load_rgb does
    _assert_loaders_agree(layout, names, train_size=12)


def _assert_loaders_agree(layout, names, train_size: int) -> None:
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, compile=False, channels_last=False, workers=1)
    reference = TorchLoaders(layout, 32, 4, workers=0, seed=0)
    dali = DaliLoaders(layout, 32, 4, rt, seed=0)
    assert dali.classes == reference.classes == layout.classes
    assert dali.train_size == reference.train_size == train_size
    assert dali.test_size == reference.test_size == len(names)
    want_x, want_y = map(torch.cat, zip(*reference.test_batches()))
    got_x, got_y = map(torch.cat, zip(*dali.test_batches()))
    assert got_y.tolist() == want_y.tolist() == [label for _, label in layout.files["test"]]
    diff = (_levels(got_x) - _levels(want_x)).abs().flatten(1)
    # tests/test_dali.py's test-pipeline tolerance: resamplers round to uint8 one level apart
    # now and then; a different decode (white 16-bit, rotated, composited) is tens of levels off.
    for name, worst, mean in zip(names, diff.max(1).values, diff.mean(1)):
        assert worst <= 1.01 and mean <= 0.3, f"{name}: max {worst:.2f}, mean {mean:.2f} levels"


def test_dali_reads_copies_of_files_its_decoder_gets_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where DALI's copies go
    root = tmp_path / "d"
    odd = {"int32.tif": Image.fromarray(_gradient(1)[..., 1].astype(np.int32) * 200),
           "float.tif": Image.fromarray(_gradient(2)[..., 0].astype(np.float32) / 255),
           "bilevel.tif": Image.fromarray(_gradient(3)[..., 2]).convert("1")}
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        _plain(root / split / "a", 1, seed=0)
        for name, img in odd.items():
            img.save(root / split / "a" / name)
    layout = scan_dataset(root)
    assert {(p.parent.parent.name, p.name) for p in layout.dali_copies} == {
        (split, name) for split in ("train", "test") for name in odd}
    names = [path.name for path, _ in layout.files["test"]]
    assert names == ["0.jpg", "bilevel.tif", "float.tif", "int32.tif"]
    _assert_loaders_agree(layout, names, train_size=4)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 6  # one copy per file, in fastft's cache
