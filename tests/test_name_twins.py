"""Class folder names that differ only in Unicode normalisation: `café` typed on Linux (NFC) and
copied from a Mac (NFD). Linux keeps both as different folders; the lines that name them show the
two spellings escaped, say how they differ and what to do, as for names that differ in case."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from fastft.data.layout import check_report, scan_dataset
from fastft.errors import DataError

NFC = unicodedata.normalize("NFC", "café")  # 'caf\xe9'
NFD = unicodedata.normalize("NFD", "café")  # 'cafe\u0301'
FIX = "rename one, or make every name NFC with `convmv -r -f utf8 -t utf8 --nfc --notest DIR`"


def _folders(root: Path, splits: dict[str, tuple[str, ...]]) -> Path:
    for split, names in splits.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(root / split / name / f"{i}.jpg")
    return root


def test_a_test_class_in_the_other_normalisation_is_named_with_both_forms(tmp_path):
    assert NFC != NFD and len(NFC) == 4 and len(NFD) == 5
    root = _folders(tmp_path / "d", {"train": (NFC, "tea"), "test": (NFD, "tea")})
    with pytest.raises(DataError) as caught:
        scan_dataset(root)
    assert str(caught.value) == (
        f"{root}/test/{NFD}: test class {NFD!r} has no folder in {root}/train, so the model could never "
        f"predict it (train classes: {NFC}, tea); train has 'caf\\xe9' (NFC) and test 'cafe\\u0301' (NFD), "
        f"which differ only in Unicode normalisation (NFC vs NFD): {FIX}")
    lines, ok = check_report(root)
    assert not ok and f"BAD {caught.value}" in lines


def test_case_and_normalisation_together_are_both_named(tmp_path):
    upper = unicodedata.normalize("NFC", "Café")
    root = _folders(tmp_path / "d", {"train": (upper, "tea"), "test": (NFD, "tea")})
    with pytest.raises(DataError) as caught:
        scan_dataset(root)
    assert str(caught.value).endswith(
        "; train has 'Caf\\xe9' (NFC) and test 'cafe\\u0301' (NFD), which differ only in letter case and "
        f"Unicode normalisation (NFC vs NFD): {FIX}")


def test_both_forms_in_one_split_are_two_classes_with_a_warning_naming_them(tmp_path):
    root = _folders(tmp_path / "d", {split: (NFC, NFD, "tea") for split in ("train", "test")})
    layout = scan_dataset(root)
    assert layout.classes == (NFD, NFC, "tea")  # ImageFolder's sorted folders: U+0065 'e' < U+00E9
    assert list(layout.warnings) == [
        f"{root}/{split}: class folders 'cafe\\u0301' (NFD) and 'caf\\xe9' (NFC) differ only in Unicode "
        f"normalisation (NFD vs NFC); they are 2 separate classes here (on macOS they would be one "
        f"folder): merge them if they hold one class" for split in ("train", "test")]
