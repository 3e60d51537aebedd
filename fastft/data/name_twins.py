"""Folder names that look the same and are not: `Dog/` and `dog/` (letter case), `café/` typed on
Linux (NFC: é is one code point, U+00E9) and `café/` copied from a Mac (NFD: e plus the combining
accent U+0301, as macOS file systems store names). Linux compares names byte by byte, so each pair
is two folders; a line that quoted both as 'café' would read as nonsense, so the lines here show
the names escaped (ascii: 'caf\\xe9', 'cafe\\u0301') and name the difference and what to do.
Unicode normalisation forms: Unicode Standard Annex #15."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from fastft.data.images import shown_path as _shown

# Makes a folder's names NFC (convmv is packaged by Debian, Fedora and Homebrew).
_TO_NFC = "convmv -r -f utf8 -t utf8 --nfc --notest DIR"


def _key(name: str) -> str:
    """What two names that differ only in case or normalisation share."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _form(name: str) -> str:
    if unicodedata.is_normalized("NFC", name):
        return "NFC"
    return "NFD" if unicodedata.is_normalized("NFD", name) else "neither NFC nor NFD"


def _difference(names: list[str]) -> str:
    """How names that share a _key differ: "letter case", "Unicode normalisation (NFC vs NFD)", or both."""
    parts = ["letter case"] if len({unicodedata.normalize("NFC", n) for n in names}) > 1 else []
    forms = list(dict.fromkeys(_form(n) for n in names))
    if len(forms) > 1:
        parts.append(f"Unicode normalisation ({' vs '.join(forms)})")
    return " and ".join(parts) or "letter case"


def _listed(names: list[str], difference: str) -> str:
    """The names as a line shows them: as they are where only case differs, else escaped with
    their forms, as two spellings of café would otherwise print alike."""
    if difference == "letter case":
        return " and ".join(map(_shown, names))
    return " and ".join(f"{ascii(n)} ({_form(n)})" for n in names)


def _advice(difference: str) -> str:
    if difference == "letter case":
        return "rename one"
    return f"rename one, or make every name NFC with `{_TO_NFC}`"


def case_hint(root: Path, split: str) -> str:
    """A hint like `; found Train/: rename it to train/` when only the letter case differs
    (names are case-sensitive on Linux, so Train/ is not train/); else ""."""
    try:
        near = sorted(e.name for e in os.scandir(root) if e.name.lower() == split and e.name != split)
    except OSError:
        return ""
    return f"; found {_shown(near[0])}/: rename it to {split}/" if near else ""


def twin_warnings(split_dir: Path, names: list[str]) -> list[str]:
    """A warning line for each set of class folders whose names differ only in letter case
    (Dog/, dog/) or Unicode normalisation. They stay separate classes, as ImageFolder keeps
    them; see README, "Inputs"."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_key(name), []).append(name)
    lines = []
    for group in (g for g in groups.values() if len(g) > 1):
        difference = _difference(group)
        # macOS folds case and normalisation; Windows (NTFS) folds case only.
        where = "macOS and Windows" if difference == "letter case" else "macOS"
        lines.append(f"{_shown(split_dir)}: class folders {_listed(group, difference)} differ only in "
                     f"{difference}; they are {len(group)} separate classes here (on {where} they would be "
                     f"one folder): merge them if they hold one class")
    return lines


def unknown_test_class(root: Path, name: str, classes: tuple[str, ...]) -> str:
    """The line for a test class folder that train lacks, naming a train class that differs from
    it only in letter case or Unicode normalisation, and what to do."""
    line = (f"{_shown(root / 'test' / name)}: test class {name!r} has no folder in {_shown(root / 'train')}, "
            f"so the model could never predict it (train classes: {', '.join(classes)})")
    twin = [c for c in classes if _key(c) == _key(name)]
    if not twin:
        return line
    difference = _difference([twin[0], name])
    if difference == "letter case":
        return f"{line}; train has {_shown(twin[0])}, which differs only in letter case: rename one"
    return (f"{line}; train has {_listed([twin[0]], difference)} and test {_listed([name], difference)}, "
            f"which differ only in {difference}: {_advice(difference)}")
