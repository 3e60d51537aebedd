"""A JPEG that lacks only its end marker (EOI) holds every pixel: the scan, data check, predict's
checks and every loader (torch, cached, DALI through a copy) read it with the complete file's
pixels, and data check names it. A JPEG cut anywhere else (scan data or whole scans missing) is
still refused alike everywhere (issue 19: damaged files that still hold every pixel)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastft.data.cached_loader import read_header
from fastft.data.images import decode_problem, image_note, load_rgb, needs_dali_copy, quick_problem
from fastft.data.jpeg_end import completed
from fastft.data.layout import check_report, scan_dataset
from fastft.errors import DataError
from loader_agreement import dali_agrees, torch_equals_cached

EOI_NOTE = "JPEG without its end marker (EOI), every pixel present: read whole"


def _noise(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise with a black band: every block codes many coefficients."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[:, :20] = 0
    return rgb


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **options)
    assert buf.getvalue().endswith(b"\xff\xd9")
    return buf.getvalue()


CODINGS = {"baseline 4:2:0": dict(quality=90), "4:4:4": dict(quality=75, subsampling=0),
           "progressive": dict(quality=90, progressive=True)}


@pytest.mark.parametrize("coding", [*CODINGS, "grey"])
def test_only_the_file_without_eoi_is_completed_whatever_the_cut(tmp_path, coding):
    pixels = _noise()[..., 0] if coding == "grey" else _noise()
    data = _jpeg(pixels, **CODINGS.get(coding, {}))
    path = tmp_path / "cut.jpg"
    taken = []
    for end in range(data.index(b"\xff\xda"), len(data) + 1):  # every cut from the first scan on
        path.write_bytes(data[:end])
        if completed(path) is not None:
            taken.append(len(data) - end)
    # Bytes missing: 2 (EOI) or 1 (its second half); a file with EOI needs no completing.
    assert taken == [2, 1]
    path.write_bytes(data[:-2])
    assert completed(path) == data


def _pair(folder: Path, seed: int) -> None:
    """whole.jpg and the same bytes without EOI, cut.jpg."""
    data = _jpeg(_noise(seed=seed), quality=90, progressive=bool(seed % 2))
    (folder / "whole.jpg").write_bytes(data)
    (folder / "cut.jpg").write_bytes(data[:-2])


def test_every_check_and_reader_takes_it_with_the_complete_files_pixels(tmp_path):
    _pair(tmp_path, seed=0)
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    assert quick_problem(cut) is None and decode_problem(cut) is None
    assert np.array_equal(np.asarray(load_rgb(cut)), np.asarray(load_rgb(whole)))
    assert np.array_equal(np.asarray(load_rgb(cut, (14, 10))), np.asarray(load_rgb(whole, (14, 10))))
    assert needs_dali_copy(cut) and not needs_dali_copy(whole)  # DALI: "Premature end of JPEG data"
    assert read_header(cut).nvjpeg is False and read_header(whole).nvjpeg is True
    assert image_note(cut) == EOI_NOTE and image_note(whole) is None


def test_a_jpeg_cut_short_is_still_refused_alike(tmp_path):
    data = _jpeg(_noise(), quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) - 40])  # 38 bytes of the last blocks missing
    reason = decode_problem(cut)
    assert reason is not None and reason.startswith("truncated or corrupt JPEG (image file is truncated")
    assert quick_problem(cut) == reason and not needs_dali_copy(cut)
    with pytest.raises(DataError) as caught:  # the cached loader decodes it with load_rgb too
        load_rgb(cut)
    assert str(caught.value) == f"{cut}: {reason}"
    scans = _jpeg(_noise(), progressive=True)  # progressive, cut where a later scan starts
    boundary = scans.rindex(b"\xff\xda")
    cut.write_bytes(scans[:boundary])
    assert completed(cut) is None and decode_problem(cut).startswith("truncated or corrupt JPEG (")


def _dataset(root: Path) -> Path:
    for split in ("train", "test"):
        for k, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            _pair(root / split / name, seed=k)
    return root


def test_torch_cached_and_dali_loaders_read_it_as_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where DALI's copies go
    layout = scan_dataset(_dataset(tmp_path / "d"))
    names = [(p.parent.name, p.name) for p, _ in layout.files["test"]]
    assert names == [("a", "cut.jpg"), ("a", "whole.jpg"), ("b", "cut.jpg"), ("b", "whole.jpg")]
    assert {p.name for p in layout.dali_copies} == {"cut.jpg"}
    torch_x = torch_equals_cached(layout)
    assert torch.equal(torch_x[0], torch_x[1]) and torch.equal(torch_x[2], torch_x[3])
    dali_agrees(layout, torch_x)


def test_data_check_lists_it_as_unusual_not_bad(tmp_path):
    root = _dataset(tmp_path / "d")
    lines, ok = check_report(root)
    assert ok and lines[-1] == "ok: all 8 images decode"
    assert f"unusual 4 images ({EOI_NOTE}): " in "\n".join(lines)
