"""Dataset validation: every bad input must become a one-line DataError that
names the offending file or folder, and good-but-unusual images must pass."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from fastft.data.images import IMAGE_EXTENSIONS, decode_problem, load_rgb, quick_problem
from fastft.data.layout import check_report, scan_dataset
from fastft.errors import DataError

CLASSES = ("hotdog", "not-hotdog")


def _jpeg_bytes(mode: str = "RGB", **save_kwargs: object) -> bytes:
    color = {"RGB": (200, 40, 10), "L": 128, "CMYK": (0, 200, 200, 10)}[mode]
    buf = io.BytesIO()
    Image.new(mode, (40, 30), color).save(buf, "JPEG", **save_kwargs)
    return buf.getvalue()


def _png_bytes() -> bytes:
    # Noise, so the compressed pixels span most of the file and cutting it in
    # half really loses image data.
    buf = io.BytesIO()
    Image.frombytes("RGB", (40, 30), os.urandom(40 * 30 * 3)).save(buf, "PNG")
    return buf.getvalue()


def make_dataset(root: Path, per_class: int = 3) -> Path:
    """2 classes x `per_class` JPEGs in each split; class 0's first three files
    are grayscale, progressive and CMYK so the odd-but-valid cases are always covered."""
    odd = [_jpeg_bytes("L"), _jpeg_bytes(progressive=True), _jpeg_bytes("CMYK")]
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                data = odd[i] if c == 0 and i < len(odd) else _jpeg_bytes()
                (folder / f"{i}.jpg").write_bytes(data)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "hotdog")


def scan_error(root: Path, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        scan_dataset(root, **kwargs)
    message = info.value.one_line()
    assert message == str(info.value), "message must be a single line"
    assert "\n" not in str(info.value)
    return message


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    out[str(root)] = (os.stat(root).st_mtime_ns, 0)
    return out


# --- good data -------------------------------------------------------------

def test_extensions_match_torchvision() -> None:
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_good_dataset_scans_and_odd_jpegs_load_as_rgb(dataset: Path) -> None:
    layout = scan_dataset(dataset, full_decode=True)
    assert layout.classes == CLASSES
    assert layout.counts("train") == {"hotdog": 3, "not-hotdog": 3}
    for path, _ in layout.files["train"]:
        assert quick_problem(path) is None and decode_problem(path) is None
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (40, 30)
    modes = [Image.open(dataset / "train/hotdog" / f"{i}.jpg").mode for i in range(3)]
    assert modes == ["L", "RGB", "CMYK"]


def test_samples_order_equals_imagefolder(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class=12)  # 10.jpg sorts before 2.jpg
    extra = root / "train" / "hotdog" / "sub"
    extra.mkdir()
    (extra / "a.PNG").write_bytes(_png_bytes())
    (root / "train" / "hotdog" / "notes.txt").write_text("ignored")
    layout = scan_dataset(root)
    for split in ("train", "test"):
        folder = ImageFolder(str(root / split))
        assert layout.classes == tuple(folder.classes)
        assert [(str(p), label) for p, label in layout.files[split]] == folder.samples


def test_hidden_and_non_image_files_are_ignored(dataset: Path) -> None:
    (dataset / "train" / "hotdog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dataset / "train" / "hotdog" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (dataset / "train" / ".ipynb_checkpoints").mkdir()
    (dataset / "test" / "hotdog" / "readme.md").write_text("hi")
    layout = scan_dataset(dataset)
    assert layout.classes == CLASSES
    assert layout.counts("train")["hotdog"] == 3


def test_trailing_bytes_after_jpeg_end_pass(dataset: Path) -> None:
    path = dataset / "train" / "hotdog" / "1.jpg"
    path.write_bytes(path.read_bytes() + b"\x00" * 7 + b"trailer")
    assert quick_problem(path) is None
    scan_dataset(dataset)
    assert load_rgb(path).mode == "RGB"


def test_png_files_pass(dataset: Path) -> None:
    path = dataset / "train" / "hotdog" / "x.png"
    path.write_bytes(_png_bytes())
    assert quick_problem(path) is None and decode_problem(path) is None
    scan_dataset(dataset, full_decode=True)


# --- bad files ---------------------------------------------------------------

@pytest.mark.parametrize("full_decode", [False, True])
def test_truncated_jpeg(dataset: Path, full_decode: bool) -> None:
    path = dataset / "train" / "not-hotdog" / "2.jpg"
    truncate(path)
    message = scan_error(dataset, full_decode=full_decode)
    assert message.startswith(f"{path}: truncated or corrupt JPEG (")
    assert "more" not in message


def test_truncated_png(dataset: Path) -> None:
    path = dataset / "test" / "hotdog" / "x.png"
    path.write_bytes(_png_bytes())
    truncate(path)
    assert scan_error(dataset).startswith(f"{path}: truncated or corrupt PNG (")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"<html>404 Not Found</html>", "not an image: starts with b'<html>40'"),
        (b"", "empty file"),
    ],
    ids=["text-as-jpg", "empty"],
)
def test_bad_file_named_in_one_line(dataset: Path, content: bytes, expected: str) -> None:
    path = dataset / "test" / "hotdog" / "1.jpg"
    path.write_bytes(content)
    assert quick_problem(path) == expected
    assert decode_problem(path) == expected
    assert scan_error(dataset) == f"{path}: {expected}"


def test_non_image_in_other_extension(dataset: Path) -> None:
    path = dataset / "train" / "hotdog" / "pic.webp"
    path.write_text("not really webp")
    assert quick_problem(path) == "not an image: starts with b'not real'"
    assert scan_error(dataset) == f"{path}: not an image: starts with b'not real'"


def test_load_rgb_on_truncated_file_raises_data_error(dataset: Path) -> None:
    path = dataset / "train" / "hotdog" / "0.jpg"
    truncate(path)
    with pytest.raises(DataError) as info:
        load_rgb(path)
    message = info.value.one_line()
    # The reason data check gives for the same file (decode_problem's), not a second wording.
    assert message == f"{path}: {decode_problem(path)}" and message.startswith(f"{path}: truncated or corrupt JPEG (")
    with pytest.raises(DataError, match="missing.jpg: no such file$"):
        load_rgb(str(dataset / "train" / "hotdog" / "missing.jpg"))


def test_several_bad_files_reported_as_first_and_more(dataset: Path) -> None:
    first = dataset / "train" / "hotdog" / "0.jpg"
    truncate(first)
    (dataset / "train" / "not-hotdog" / "1.jpg").write_bytes(b"")
    (dataset / "test" / "hotdog" / "2.jpg").write_text("hello")
    message = scan_error(dataset)
    assert message.startswith(f"{first}: truncated or corrupt JPEG")
    assert f"(and 2 more bad files; run `fastft data check {dataset}` to list them)" in message


# --- bad structure -----------------------------------------------------------

def test_missing_root(tmp_path: Path) -> None:
    assert scan_error(tmp_path / "nope").startswith(f"{tmp_path / 'nope'}: ")
    (tmp_path / "file").write_text("x")
    assert scan_error(tmp_path / "file").startswith(f"{tmp_path / 'file'}: not a folder")


def test_missing_test_split(dataset: Path) -> None:
    for f in (dataset / "test").rglob("*.jpg"):
        f.unlink()
    for d in sorted((dataset / "test").iterdir()):
        d.rmdir()
    (dataset / "test").rmdir()
    assert scan_error(dataset) == (
        f"{dataset}/test: missing split folder "
        f"(expected {dataset}/train and {dataset}/test)"
    )


def test_split_without_class_folders(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    for f in (root / "test" / "hotdog").iterdir():
        f.rename(root / "test" / f"h{f.name}")
    for d in ("hotdog", "not-hotdog"):
        for f in (root / "test" / d).iterdir():
            f.unlink()
        (root / "test" / d).rmdir()
    message = scan_error(root)
    assert message.startswith(f"{root}/test: no class folders")
    assert "found 3 images directly inside it" in message


def test_empty_class_folder(dataset: Path) -> None:
    (dataset / "train" / "zebra").mkdir()
    (dataset / "train" / "zebra" / "notes.txt").write_text("x")
    assert scan_error(dataset).startswith(f"{dataset}/train/zebra: no images")


def test_test_class_unknown_to_train_is_named(dataset: Path) -> None:
    (dataset / "test" / "not-hotdog").rename(dataset / "test" / "nothotdog")
    assert scan_error(dataset) == (
        f"{dataset}/test/nothotdog: test class 'nothotdog' has no folder in {dataset}/train, "
        f"so the model could never predict it (train classes: hotdog, not-hotdog)"
    )


def three_class_dataset(root: Path, test_classes: tuple[str, ...] = ("a", "c")) -> Path:
    """train/{a,b,c} x 2 JPEGs; test has 2 JPEGs in each of `test_classes`."""
    for split, names in (("train", ("a", "b", "c")), ("test", test_classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                (root / split / name / f"{i}.jpg").write_bytes(_jpeg_bytes())
    return root


def test_test_split_without_a_train_class_keeps_train_labels(tmp_path: Path) -> None:
    root = three_class_dataset(tmp_path / "d")
    layout = scan_dataset(root)
    assert layout.classes == ("a", "b", "c")
    assert [(p.parent.name, label) for p, label in layout.files["test"]] == [("a", 0)] * 2 + [("c", 2)] * 2
    assert [label for _, label in layout.files["train"]] == [0, 0, 1, 1, 2, 2]
    assert layout.missing_in_test == ("b",)
    assert layout.warnings == (f"{root}/test: no folder for train class b; "
                               f"test metrics cover the other classes only",)
    assert layout.counts("test") == {"a": 2, "b": 0, "c": 2}


def test_empty_test_class_folder_is_a_warning(tmp_path: Path) -> None:
    root = three_class_dataset(tmp_path / "d")
    (root / "test" / "b").mkdir()
    (root / "test" / "b" / ".DS_Store").write_bytes(b"\x00")
    layout = scan_dataset(root)
    assert [label for _, label in layout.files["test"]] == [0, 0, 2, 2]
    assert layout.missing_in_test == ("b",)
    assert layout.warnings == (f"{root}/test/b: empty class folder; the test split has no 'b' images",)
    assert layout.ignored == (root / "test" / "b" / ".DS_Store",)


def test_test_split_with_no_image_at_all_fails(tmp_path: Path) -> None:
    root = three_class_dataset(tmp_path / "d", test_classes=())
    (root / "test" / "a").mkdir(parents=True)
    assert scan_error(root).startswith(f"{root}/test: no images in any class folder (expected ")


def test_skip_bad_emptying_a_class(tmp_path: Path) -> None:
    root = three_class_dataset(tmp_path / "d", test_classes=("a", "b", "c"))
    for i in range(2):
        truncate(root / "test" / "c" / f"{i}.jpg")
    layout = scan_dataset(root, skip_bad=True)
    assert layout.missing_in_test == ("c",) and len(layout.dropped) == 2
    assert layout.warnings == (f"{root}/test/c: no images left after skipping 2 bad files; "
                               f"the test split has no 'c' images",)
    for i in range(2):
        truncate(root / "train" / "b" / f"{i}.jpg")
    assert scan_error(root, skip_bad=True) == f"{root}/train/b: no images left after skipping 4 bad files"


# --- the check command -------------------------------------------------------

def test_check_report_good(dataset: Path) -> None:
    lines, ok = check_report(dataset)
    assert ok
    assert lines == [
        f"{dataset}: 2 classes (hotdog, not-hotdog)",
        "train: 6 images (hotdog 3, not-hotdog 3)",
        "test: 6 images (hotdog 3, not-hotdog 3)",
        "unusual 2 images (CMYK, converted to RGB): train/hotdog/2.jpg, test/hotdog/2.jpg",
        "ok: all 12 images decode",
    ]


def test_check_report_lists_gaps_ignored_entries_and_conversions(tmp_path: Path) -> None:
    root = three_class_dataset(tmp_path / "d")
    (root / "test" / "b").mkdir()
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00")
    (root / "train" / "a" / "notes.txt").write_text("x")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / "a" / ".cache").mkdir()
    (root / "test" / "a" / ".cache" / "3.jpg").write_bytes(_jpeg_bytes())
    Image.new("I;16", (4, 4), 1000).save(root / "train" / "c" / "deep.png")
    palette = Image.new("P", (4, 4), 1)
    palette.save(root / "test" / "c" / "logo.png", transparency=1)
    rotated = Image.new("RGB", (4, 2))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "train" / "b" / "turned.jpg", exif=exif)
    lines, ok = check_report(root)
    assert ok
    assert lines == [
        f"{root}: 3 classes (a, b, c)",
        "train: 8 images (a 2, b 3, c 3)",
        "test: 5 images (a 2, b 0, c 3)",
        f"warning: {root}/test/b: empty class folder; the test split has no 'b' images",
        "ignored 3 entries (hidden): train/.ipynb_checkpoints, train/a/.DS_Store, test/a/.cache",
        "ignored 1 entry (not .jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp): train/a/notes.txt",
        "unusual 1 image (EXIF orientation 6 ignored: read as stored, as ImageFolder does): "
        "train/b/turned.jpg",
        "unusual 1 image (16-bit grayscale, scaled by 255/65535): train/c/deep.png",
        "unusual 1 image (palette with transparency, transparency ignored): test/c/logo.png",
        "ok: all 13 images decode",
    ]


def test_check_report_lists_every_bad_file(dataset: Path) -> None:
    bad = [dataset / "train" / "hotdog" / "0.jpg", dataset / "test" / "not-hotdog" / "2.jpg"]
    truncate(bad[0])
    bad[1].write_bytes(b"<html>404 Not Found</html>")
    lines, ok = check_report(dataset)
    assert not ok
    bad_lines = [line for line in lines if line.startswith("BAD ")]
    assert [line.split(": ", 1)[0] for line in bad_lines] == [f"BAD {p}" for p in bad]
    assert bad_lines[1] == f"BAD {bad[1]}: not an image: starts with b'<html>40'"
    assert lines[-1] == "2 bad files out of 12 images"


def test_check_report_lists_structure_problems_and_still_decodes(dataset: Path) -> None:
    (dataset / "train" / "zebra").mkdir()
    truncate(dataset / "train" / "hotdog" / "0.jpg")
    lines, ok = check_report(dataset)
    assert not ok
    assert [line for line in lines if line.startswith("BAD ")] == [
        f"BAD {dataset}/train/zebra: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})",
        f"BAD {dataset}/train/hotdog/0.jpg: " + decode_problem(dataset / "train" / "hotdog" / "0.jpg")]
    assert lines[-1] == "1 folder problem; 1 bad file out of 12 images"
    with pytest.raises(DataError, match="nope: dataset folder not found"):  # nothing to check at all
        check_report(dataset / "nope")


def test_scan_and_check_never_write_into_dataset(dataset: Path) -> None:
    truncate(dataset / "train" / "hotdog" / "0.jpg")
    before = snapshot(dataset)
    with pytest.raises(DataError):
        scan_dataset(dataset)
    with pytest.raises(DataError):
        scan_dataset(dataset, full_decode=True)
    check_report(dataset)
    assert snapshot(dataset) == before


def test_odd_names_and_links_stay_one_line(dataset: Path) -> None:
    (dataset / "train" / "hotdog" / "bad\nname.jpg").write_bytes(b"")
    os.symlink(dataset / "gone.jpg", dataset / "train" / "hotdog" / "link.jpg")
    (dataset / "test" / "hotdog" / "scan.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    lines, ok = check_report(dataset)
    assert not ok and all("\n" not in line for line in lines)
    bad = {line.split(": ", 1)[1] for line in lines if line.startswith("BAD ")}
    assert bad == {"empty file", "broken symlink (its target does not exist)",
                   "corrupt TIFF header (PIL cannot identify the file)"}
    assert scan_error(dataset).startswith(repr(str(dataset / "train/hotdog/bad\nname.jpg")))
