"""The synthetic dataset: layout, web-like JPEG variety, determinism, atomicity, a learnable signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastft.data.synth as synth
from fastft.data.synth import CLASS_NAMES, cached_synthetic, write_synthetic
from fastft.errors import DataError

N_TRAIN, N_TEST = 41, 10  # odd train count: hotdog must get the extra image


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth") / "ds", N_TRAIN, N_TEST, seed=0, progress=False)


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def _sausage_fraction(path: Path) -> float:
    """Share of pixels in the reddish-brown band only sausages are drawn in."""
    with Image.open(path) as img:
        a = np.asarray(img.convert("RGB").resize((64, 64)), np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mask = (r >= 135) & (r <= 220) & (g >= 40) & (g <= 115) & (b <= 85) & (r - g >= 55)
    return float(mask.mean())


def test_counts_per_split_and_class(data):
    assert sorted(p.name for p in data.iterdir()) == ["test", "train"]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        assert sorted(p.name for p in (data / split).iterdir()) == sorted(CLASS_NAMES)
        hot = len(list((data / split / "hotdog").glob("*.jpg")))
        other = len(list((data / split / "not-hotdog").glob("*.jpg")))
        assert (hot, other) == ((n + 1) // 2, n // 2)
    assert all(len(p.stem) == 5 and p.stem.isdigit() for p in _files(data))


def test_files_decode_with_web_like_variety(data):
    shapes, modes, progressive, qtables, sizes = set(), set(), 0, set(), set()
    for path in _files(data):
        with Image.open(path) as img:
            assert img.format == "JPEG"
            img.load()  # a truncated or corrupt file fails here
            w, h = img.size
            assert 120 <= min(w, h) <= 500
            assert 1.3 <= max(w, h) / min(w, h) <= 1.8
            shapes.add("landscape" if w > h else "portrait")
            modes.add(img.mode)
            progressive += bool(img.info.get("progressive") or img.info.get("progression"))
            qtables.add(tuple(img.quantization[0]))
            sizes.add(min(w, h) // 50)
    assert shapes == {"landscape", "portrait"}
    assert modes == {"RGB", "L"}
    assert progressive >= 1
    assert len(qtables) >= 5, "JPEG quality should vary from file to file"
    assert len(sizes) >= 4, "short sides should spread over 120-500 px"


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    a = write_synthetic(tmp_path / "a", 6, 4, seed=3, progress=False)
    b = write_synthetic(tmp_path / "b", 6, 4, seed=3, progress=False)
    c = write_synthetic(tmp_path / "c", 6, 4, seed=4, progress=False)
    rel = [p.relative_to(a) for p in _files(a)]
    assert rel == [p.relative_to(b) for p in _files(b)] == [p.relative_to(c) for p in _files(c)]
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in rel)
    assert all((a / r).read_bytes() != (c / r).read_bytes() for r in rel)


def test_refuses_non_empty_root_but_fills_an_empty_one(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_synthetic(root, 4, 2, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_synthetic(empty, 4, 2, progress=False)
    assert len(_files(empty)) == 6


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_render = synth._render

    def flaky(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(synth, "_render", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "ds", 6, 4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cached_synthetic_generates_once(tmp_path, monkeypatch):
    root = cached_synthetic(tmp_path, 4, 2, seed=1)
    assert root == tmp_path / "synthetic-s1-4-2"
    first = {p: p.stat().st_mtime_ns for p in _files(root)}
    assert len(first) == 6

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached_synthetic regenerated an existing dataset")

    monkeypatch.setattr(synth, "write_synthetic", must_not_run)
    assert cached_synthetic(tmp_path, 4, 2, seed=1) == root
    assert {p: p.stat().st_mtime_ns for p in _files(root)} == first


def test_bad_arguments_are_data_errors(tmp_path):
    with pytest.raises(DataError):
        write_synthetic(tmp_path / "x", 1, 2, progress=False)
    with pytest.raises(DataError):
        write_synthetic(tmp_path / "y", 4, 2, seed=-1, progress=False)


def test_sausage_colour_separates_the_classes(data):
    """Cheap stand-in for 'a CNN can learn this': the colour cue alone sorts most images."""
    hot = [_sausage_fraction(p) for p in sorted((data / "train" / "hotdog").glob("*.jpg"))][:20]
    other = [_sausage_fraction(p) for p in sorted((data / "train" / "not-hotdog").glob("*.jpg"))][:20]
    assert np.mean(hot) > 0.05 > 10 * np.mean(other)
    correct = sum(f > 0.02 for f in hot) + sum(f <= 0.02 for f in other)
    assert correct >= 36  # of 40; grayscale hotdogs lose the colour cue by design
