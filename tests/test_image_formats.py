"""Files whose format, coding or size the name does not tell: an image over Pillow's pixel
limit, lossless and 12-bit JPEGs, AVIF, HEIC and PNG saved as .jpg. Each is read the same by
the scan, data check, predict's checks and every loader (torch, cached, DALI through its
copies), or refused by all of them with the same line naming what it is. The inputs are made
here: the JPEGs byte by byte (jpeg_codings.py), the huge PNG from its chunks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from fastft.data import decoders
from fastft.data.cached_loader import read_header
from fastft.data.formats import MAX_PIXELS_ENV, max_pixels
from fastft.data.images import decode_problem, image_note, load_rgb, needs_dali_copy, quick_problem
from fastft.data.layout import check_report, scan_dataset
from fastft.errors import ConfigError, DataError
from heif_writer import heic_writable, write_heic
from jpeg_codings import flat_block_jpeg, lossless_jpeg
from loader_agreement import dali_agrees, torch_equals_cached

AVIF = pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A white 1-bit PNG, from its chunks: 13,400 px square is a 22 KB file."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte 0, then the packed bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * height, 6))
            + _chunk(b"IEND", b""))


def _gradient(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return (np.stack([xs * 7 + seed * 30, ys * 9, (xs + ys) * 4 + seed], axis=-1) % 256).astype(np.uint8)


def _refused_alike(path: Path, reason: str, loaders: bool = True) -> None:
    """The reason every path gives for `path`: both checks (the scan, data check, predict) and,
    with `loaders`, load_rgb (torch loader, predict) and the cached loader's plan."""
    assert quick_problem(path) == decode_problem(path) == reason
    for read in (load_rgb, read_header) if loaders else ():
        with pytest.raises(DataError) as caught:
            read(path)
        assert str(caught.value) == f"{path}: {reason}"


# --- 1. huge images ------------------------------------------------------------------------------

def test_an_image_over_pillows_limit_is_read_by_every_path(tmp_path):
    """13,400 x 13,400 1-bit (179.6 megapixels): Pillow refuses it as a decompression bomb, DALI
    trains on it; under fastft's one limit (268 megapixels) the torch and cached loaders,
    predict and data check read it too."""
    path = tmp_path / "scan.png"
    path.write_bytes(bilevel_png(13_400, 13_400))
    assert quick_problem(path) is None and decode_problem(path) is None
    header = read_header(path)  # the cached loader's plan
    assert (header.height, header.width, header.nvjpeg) == (13_400, 13_400, False)
    rgb = load_rgb(path)  # the torch and cached loaders' decode, predict's too
    assert rgb.size == (13_400, 13_400) and rgb.mode == "RGB" and rgb.getextrema() == ((255, 255),) * 3


def test_one_pixel_limit_refuses_alike_everywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    for split, name in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")):
        (tmp_path / "d" / split / name).mkdir(parents=True)
        Image.fromarray(_gradient()).save(tmp_path / "d" / split / name / "small.png")  # 32 x 24 = 768 px
    folder = tmp_path / "d" / "train" / "a"
    Image.fromarray(_gradient(24, 48)).save(folder / "wide.png")
    Image.fromarray(_gradient(30, 40)).save(folder / "photo.jpg")
    Image.fromarray(_gradient(30, 40)).save(folder / "old.bmp")  # Pillow's header path
    over = {name: f"{w}x{h} px is over fastft's limit of 1000 px per image, a guard against decompression "
                  f"bombs; to read it, set {MAX_PIXELS_ENV}={w * h} (0 = no limit), or downscale the file"
            for name, (w, h) in {"wide.png": (48, 24), "photo.jpg": (40, 30), "old.bmp": (40, 30)}.items()}
    assert quick_problem(folder / "small.png") is None
    for name, reason in over.items():
        _refused_alike(folder / name, reason)
    with pytest.raises(DataError) as caught:  # the scan: so DALI never meets one either
        scan_dataset(tmp_path / "d")
    assert str(caught.value).startswith(f"{folder / 'old.bmp'}: {over['old.bmp']} (and 2 more bad files")
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    assert max_pixels() is None and all(quick_problem(folder / name) is None for name in over)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=f"^{MAX_PIXELS_ENV}='lots' is not a number of pixels"):
        quick_problem(folder / "wide.png")


# --- 2. JPEG codings -----------------------------------------------------------------------------

def test_a_lossless_jpeg_is_read_exactly_and_dali_gets_a_copy(tmp_path):
    rgb, grey = _gradient(), _gradient()[..., 1]
    for name, pixels in (("colour.jpg", rgb), ("grey.jpg", grey)):
        path = tmp_path / name
        path.write_bytes(lossless_jpeg(pixels))
        assert quick_problem(path) is None and decode_problem(path) is None
        want = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
        assert np.array_equal(np.asarray(load_rgb(path)), want), name
        assert needs_dali_copy(path), name  # DALI 2.4 fails on the grey one
        assert not read_header(path).nvjpeg, name  # the cached loader decodes it with load_rgb


def test_a_12_bit_jpeg_is_named_not_called_corrupt(tmp_path):
    path = tmp_path / "scan.jpg"
    path.write_bytes(flat_block_jpeg(np.array([[0, 4095], [1000, 2048]]), precision=12))
    eight = tmp_path / "eight.jpg"  # the same builder at 8 bits: a valid stream, decoded exactly
    eight.write_bytes(flat_block_jpeg(np.array([[0, 255], [100, 128]]), precision=8))
    assert np.array_equal(np.asarray(load_rgb(eight))[::8, ::8, 0], [[0, 255], [100, 128]])
    _refused_alike(path, "12-bit extended sequential JPEG (SOF1): fastft reads 8-bit JPEGs only "
                         "(Pillow, torchvision and DALI decode no other precision); convert it to a "
                         "16-bit PNG or an 8-bit JPEG with a tool that reads it")


# --- 3. other formats behind a .jpg name ---------------------------------------------------------

def _no_readers(monkeypatch):
    monkeypatch.setattr(decoders, "_pillow_reads", lambda kind: False)
    monkeypatch.setattr(decoders, "_torchcodec_reads", lambda kind: False)


def fake_heic(path: Path) -> Path:
    """An ISO BMFF file with HEIC's brands; no decoder here could read its (absent) image."""
    path.write_bytes(struct.pack(">I", 24) + b"ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    return path


def test_a_real_heic_saved_as_jpg_is_read_where_a_decoder_is_installed(tmp_path):
    if not heic_writable(tmp_path) or decoders.reader_of("HEIC") is None:
        pytest.skip("no libheif with an HEVC encoder to write one, or no installed HEIC decoder")
    ys, xs = np.mgrid[0:48, 0:64]
    pixels = np.stack([xs * 4, ys * 5, (xs + ys) * 2], axis=-1).astype(np.uint8)  # smooth: lossy-friendly
    path = write_heic(tmp_path / "IMG_0001.jpg", pixels)
    assert quick_problem(path) is None and decode_problem(path) is None and needs_dali_copy(path)
    got = np.asarray(load_rgb(path)).astype(int)
    assert got.shape == (48, 64, 3) and np.abs(got - pixels).mean() < 3  # lossy HEVC, 4:2:0: measured 1.1
    assert image_note(path) == "HEIC data behind a .jpg name, read as HEIC"
    assert (read_header(path).height, read_header(path).width) == (48, 64)


def test_heic_without_a_decoder_names_the_format_and_the_package(tmp_path, monkeypatch):
    _no_readers(monkeypatch)
    path = fake_heic(tmp_path / "IMG_0001.jpg")
    _refused_alike(path, "HEIC image, which no installed decoder reads: pip install pillow-heif")
    assert needs_dali_copy(path)


@AVIF
def test_avif_saved_as_jpg_is_read_by_pillow_or_torchcodec_else_named(tmp_path, monkeypatch):
    path = tmp_path / "export.jpg"
    Image.fromarray(_gradient()).save(path, "AVIF", quality=90)
    with Image.open(path) as img:
        want = np.asarray(img.convert("RGB"))
    assert quick_problem(path) is None and decode_problem(path) is None and needs_dali_copy(path)
    assert np.array_equal(np.asarray(load_rgb(path)), want)
    assert image_note(path) == "AVIF data behind a .jpg name, read as AVIF"
    header = read_header(path)
    assert (header.height, header.width, header.nvjpeg) == (24, 32, False)
    if decoders.torchcodec_decoders() is not None:  # Pillow without AVIF: torchcodec decodes it
        monkeypatch.setattr(decoders, "_pillow_reads", lambda kind: False)
        assert decoders.reader_of("AVIF") == "torchcodec" and decode_problem(path) is None
        assert np.abs(np.asarray(load_rgb(path)).astype(int) - want).max() <= 1
        assert read_header(path).height == 24
    _no_readers(monkeypatch)  # the checks only: this Pillow's Image.open still knows AVIF
    _refused_alike(path, "AVIF image, which no installed decoder reads: pip install -U pillow (11.3 or "
                         "later reads AVIF)", loaders=False)


# --- every loader on one folder of them ----------------------------------------------------------

def mixed_codings(root: Path, heic: bool = False) -> Path:
    """train and test: a plain JPEG, lossless colour and grey JPEGs, a PNG and an AVIF named .jpg,
    and with `heic` a HEIC named .jpg."""
    for split in ("train", "test"):
        for k, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            Image.fromarray(_gradient(seed=k)).save(folder / "plain.jpg", quality=95)
            (folder / "lossless.jpg").write_bytes(lossless_jpeg(_gradient(seed=k + 2)))
            (folder / "grey.jpg").write_bytes(lossless_jpeg(_gradient(seed=k + 4)[..., 0]))
            Image.fromarray(_gradient(seed=k + 6)).save(folder / "png.jpg", "PNG")
            if features.check("avif"):
                Image.fromarray(_gradient(seed=k + 8)).save(folder / "phone.jpg", "AVIF")
            if heic:
                write_heic(folder / "iphone.jpg", _gradient(seed=k + 10))
    return root


def test_torch_cached_and_dali_loaders_agree_on_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where DALI's copies go
    heic = heic_writable(tmp_path) and decoders.reader_of("HEIC") is not None
    layout = scan_dataset(mixed_codings(tmp_path / "d", heic))
    n = len(layout.files["test"])
    copied = {p.name for p in layout.dali_copies}
    assert copied == {"lossless.jpg", "grey.jpg"} | ({"phone.jpg"} if features.check("avif") else set()) | (
        {"iphone.jpg"} if heic else set())
    torch_x = torch_equals_cached(layout)
    assert len(torch_x) == n
    dali_agrees(layout, torch_x)


def test_data_check_reports_them_and_refuses_none(tmp_path):
    root = mixed_codings(tmp_path / "d")
    (root / "train" / "a" / "scan.jpg").write_bytes(flat_block_jpeg(np.array([[7]]), precision=12))
    lines, ok = check_report(root)
    assert not ok and lines[-1].startswith("1 bad file out of")
    assert [line for line in lines if line.startswith("BAD ")] == [
        f"BAD {root / 'train' / 'a' / 'scan.jpg'}: 12-bit extended sequential JPEG (SOF1): fastft reads "
        f"8-bit JPEGs only (Pillow, torchvision and DALI decode no other precision); convert it to a "
        f"16-bit PNG or an 8-bit JPEG with a tool that reads it"]
    assert any(line.startswith("unusual 4 images (PNG data behind a .jpg name, read as PNG)") for line in lines)
