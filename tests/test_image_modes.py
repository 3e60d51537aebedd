"""Every PIL mode becomes the same 8-bit RGB in every loader: load_rgb's table of
modes (exact values), its refusals, and DALI's decoder agreeing with it (within
one level) on each file, directly or through the RGB PNG copy layout.dali_files
gives DALI.

Refused: 32-bit integer (I) images with values outside 0..65535 and float (F)
images outside 0..1 or not finite. Neither has a white level to scale by, and
clipping would silently flatten the image; DALI itself fails on 32-bit integer
TIFFs and clips floats.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastft.data.images import decode_problem, load_rgb, needs_dali_copy, rgb_copy
from fastft.errors import DataError

PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]


def _grey(levels):
    return [(v, v, v) for v in levels]


def _palette() -> Image.Image:
    img = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8), "P")
    img.putpalette(PALETTE)
    return img


def _image(mode: str, array: np.ndarray) -> Image.Image:
    """`array` (H, W[, bands]) as raw pixels of `mode`, in native byte order."""
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())


def _row(mode: str, values, dtype) -> Image.Image:
    return _image(mode, np.array([values], dtype))


# id, file name, image, save options, expected RGB of the row of pixels
MODES = [
    ("1", "x.png", _row("L", [0, 255, 255, 0], np.uint8).convert("1"), {}, _grey([0, 255, 255, 0])),
    ("L", "x.png", _row("L", [0, 1, 128, 255], np.uint8), {}, _grey([0, 1, 128, 255])),
    # Alpha is dropped, not composited: alpha 0 keeps its grey level.
    ("LA", "x.png", _row("LA", [[10, 0], [20, 64], [30, 128], [40, 255]], np.uint8), {}, _grey([10, 20, 30, 40])),
    ("P", "x.png", _palette(), {}, COLOURS),
    ("P-transparent-index", "x.png", _palette(), {"transparency": 1}, COLOURS),
    ("P-alpha-table", "x.png", _palette(), {"transparency": bytes([0, 128, 255, 255])}, COLOURS),
    ("RGB", "x.png", _row("RGB", [[1, 2, 3], [250, 128, 0], [0, 0, 0], [255, 255, 255]], np.uint8), {},
     [(1, 2, 3), (250, 128, 0), (0, 0, 0), (255, 255, 255)]),
    ("RGBA", "x.png", _row("RGBA", [[200, 100, 50, 0], [200, 100, 50, 255], [0, 0, 0, 0], [9, 9, 9, 9]], np.uint8),
     {}, [(200, 100, 50), (200, 100, 50), (0, 0, 0), (9, 9, 9)]),
    # DALI's CMYK: (255 - C)(255 - K) / 255 rounded down; (0, 200, 200, 10) -> (245, 52.8, 52.8).
    ("CMYK", "x.tif", _row("CMYK", [[0, 200, 200, 10], [255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]], np.uint8),
     {}, [(245, 52, 52), (0, 255, 255), (0, 0, 0), (255, 255, 255)]),
    # 16-bit: v * 255 / 65535 rounded (128 -> 0.498 -> 0, 129 -> 0.502 -> 1), as DALI scales it.
    ("I;16", "x.png", _row("I;16", [0, 128, 129, 32768, 65535], "<u2"), {}, _grey([0, 0, 1, 128, 255])),
    ("I;16B", "x.tif", _row("I;16B", [0, 128, 129, 32768, 65535], ">u2"),
     {}, _grey([0, 0, 1, 128, 255])),
    ("I", "x.tif", _row("I", [0, 257, 32768, 65535], np.int32), {}, _grey([0, 1, 128, 255])),
    # Float: x * 255, halves rounded up as DALI rounds them (0.5 -> 127.5 -> 128).
    ("F", "x.tif", _row("F", [0.0, 0.25, 0.5, 1.0], np.float32), {}, _grey([0, 64, 128, 255])),
]


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict[str, tuple]:
    folder = tmp_path_factory.mktemp("modes")
    files = {}
    for case_id, name, img, options, expected in MODES:
        path = folder / f"{case_id}-{name}"
        img.save(path, **options)
        files[case_id] = (path, expected)
    return files


@pytest.mark.parametrize("case_id", [case[0] for case in MODES])
def test_load_rgb_maps_each_mode_to_known_rgb(mode_files, case_id):
    path, expected = mode_files[case_id]
    assert Image.open(path).mode == case_id.split("-")[0]  # the file really is in that mode
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert np.asarray(img)[0].tolist() == [list(rgb) for rgb in expected]
    assert decode_problem(path) is None


def test_16bit_ramp_is_a_ramp_not_white(tmp_path):
    """The issue's file: PIL's own convert("RGB") clips it to a mean of 254.5."""
    path = tmp_path / "ramp.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert abs(rgb.mean() - 127.5) <= 0.5


@pytest.mark.parametrize("case_id, image, reason", [
    ("int-above", _row("I", [0, 70000], np.int32),
     "integer image with values 0..70000, outside the 16-bit range 0..65535; save it as 8- or 16-bit"),
    ("int-negative", _row("I", [-5, 10], np.int32),
     "integer image with values -5..10, outside the 16-bit range 0..65535; save it as 8- or 16-bit"),
    ("float-above", _row("F", [0.0, 2.0], np.float32),
     "float image with values 0..2, outside 0..1; save it as 8- or 16-bit"),
    ("float-nan", _row("F", [0.0, np.nan], np.float32), "float image with NaN or infinite values"),
])
def test_unmappable_values_are_one_line_errors_naming_the_file(tmp_path, case_id, image, reason):
    path = tmp_path / f"{case_id}.tif"
    image.save(path)
    with pytest.raises(DataError) as info:
        load_rgb(path)
    assert str(info.value) == f"{path}: cannot map image to RGB ({reason})"
    assert decode_problem(path) == f"cannot map image to RGB ({reason})"  # data check and --skip-bad see it


# --- DALI's decoder ------------------------------------------------------------------------------

def _extra_files(folder) -> list:
    """Files DALI's own decoder gets wrong or cannot read, and more it reads right."""
    grey = np.arange(0, 256, 8, dtype=np.uint8).reshape(4, 8)
    rgb = np.stack([grey, grey[::-1], grey // 2], axis=-1)
    cmyk = np.stack([grey, 255 - grey, grey // 3, grey // 4], axis=-1)
    made = {
        "1.tif": Image.fromarray(grey).convert("1"),  # DALI: fails (no BitsPerSample)
        "LA.tif": _image("LA", np.stack([grey, 255 - grey], -1)),  # DALI: up to 195 levels off
        "LAB.tif": _image("LAB", rgb),  # DALI: 57 levels off
        "F.tif": Image.fromarray(grey.astype(np.float32) / 255),
        "cmyk.jpg": _image("CMYK", cmyk),
        "L.bmp": Image.fromarray(grey),
        "P.bmp": Image.fromarray(rgb).quantize(8),
        "rgba.webp": _image("RGBA", np.dstack([rgb, grey])),
        "L.pgm": Image.fromarray(grey),
    }
    paths = []
    for name, img in made.items():
        options = {"quality": 100} if name.endswith(".jpg") else {"lossless": True} if name.endswith(".webp") else {}
        img.save(folder / name, **options)
        paths.append(folder / name)
    values = (np.arange(32).reshape(4, 8) * 3).astype(">u2")
    for name, maxval in (("max100.pgm", 100), ("max1000.pgm", 1000), ("max65535.pgm", 65535)):
        data = values.astype(np.uint8) if maxval < 256 else values  # DALI ignores a maxval but 255/65535
        (folder / name).write_bytes(b"P5\n8 4\n%d\n" % maxval + data.tobytes())
        paths.append(folder / name)
    return paths


def _dali_decode(paths) -> list[np.ndarray]:
    dali = pytest.importorskip("nvidia.dali")
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=[str(p) for p in paths])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipe = decode()
    pipe.build()
    out = pipe.run()[0]
    return [np.array(out[i]) for i in range(len(paths))]


def test_dali_gives_every_mode_load_rgbs_pixels(mode_files, tmp_path):
    """Each file as the DALI loader reads it (the file, or its RGB PNG copy when
    needs_dali_copy) decodes within one level of load_rgb."""
    pytest.importorskip("nvidia.dali")
    paths = [path for path, _ in mode_files.values()] + _extra_files(tmp_path)
    sources = [rgb_copy(p, tmp_path / "cache") if needs_dali_copy(p) else p for p in paths]
    for path, got in zip(paths, _dali_decode(sources)):
        want = np.asarray(load_rgb(path)).astype(int)
        assert got.shape == want.shape, path.name
        assert np.abs(got.astype(int) - want).max() <= 1, path.name


def test_files_dali_reads_unlike_load_rgb_get_copies(mode_files, tmp_path):
    extra = {p.name: p for p in _extra_files(tmp_path)}
    copied = {case_id for case_id, (path, _) in mode_files.items() if needs_dali_copy(path)}
    assert copied == {"I", "F"}  # DALI fails on 32-bit integers and clips floats
    assert {name for name, path in extra.items() if needs_dali_copy(path)} == {
        "1.tif", "LA.tif", "LAB.tif", "F.tif", "max100.pgm", "max1000.pgm"}
