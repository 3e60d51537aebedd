"""Find and validate the dataset before any training starts.

torchvision's ImageFolder reports a bad layout with a generic exception and a
bad image only when a worker reaches it mid-epoch.  Scanning up front lets us
name the exact folder or file that is wrong, in one line, before the user has
waited for a model download or a first epoch.  The sample order matches
ImageFolder's so labels mean the same thing whichever one a caller uses.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fastft.data.images import IMAGE_EXTENSIONS, decode_problem, quick_problem
from fastft.data.images import shown_path as _shown
from fastft.errors import DataError

SPLITS = ("train", "test")
# Decoding is mostly C code that releases the GIL; a few threads are enough
# to keep disks and cores busy without oversubscribing a laptop.
_MAX_DECODE_THREADS = 8


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[tuple[Path, int], ...]]
    # (path, reason) of each bad file that scan_dataset(skip_bad=True) left out.
    dropped: tuple[tuple[Path, str], ...] = ()

    def counts(self, split: str) -> dict[str, int]:
        """Number of files per class in `split`, in class order."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.files[split]:
            counts[self.classes[label]] += 1
        return counts


def _plural(n: int, word: str, words: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _unreadable(err: OSError) -> DataError:
    where = err.filename if err.filename is not None else "dataset"
    return DataError(f"{_shown(where)}: cannot read folder ({err.strerror or err})")


def _check_dir(path: Path, missing: str) -> None:
    if not path.exists():
        raise DataError(f"{_shown(path)}: {missing}")
    if not path.is_dir():
        raise DataError(f"{_shown(path)}: not a folder ({missing})")


def _class_names(split_dir: Path) -> list[str]:
    """Class folder names, sorted as ImageFolder's find_classes sorts them."""
    # Unlike ImageFolder we skip hidden folders: a stray .ipynb_checkpoints
    # would otherwise become a class and shift every label after it.
    try:
        with os.scandir(split_dir) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
            if names:
                return names
        stray = [n for n in os.listdir(split_dir) if _is_image_name(n)]
    except OSError as err:
        raise _unreadable(err) from err
    hint = f"; found {_plural(len(stray), 'image')} directly inside it" if stray else ""
    raise DataError(
        f"{_shown(split_dir)}: no class folders "
        f"(expected {_shown(split_dir / 'CLASS')}/*.jpg{hint})"
    )


def _class_files(class_dir: str) -> list[Path]:
    """Image files under `class_dir`, in the order ImageFolder's make_dataset uses."""
    def fail(err: OSError) -> None:
        raise _unreadable(err)

    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        # Pruning in place keeps the walk out of .git, .ipynb_checkpoints etc.
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found.append((dirpath, filenames))
    found.sort()
    return [
        Path(os.path.join(dirpath, name))
        for dirpath, filenames in found
        for name in sorted(filenames)
        if _is_image_name(name)
    ]


def _scan_split(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    names = _class_names(split_dir)
    per_class = []
    for name in names:
        # Built with os.path.join so paths are the same strings ImageFolder makes.
        class_dir = os.path.join(split_dir, name)
        files = _class_files(class_dir)
        if not files:
            raise DataError(f"{_shown(class_dir)}: no images "
                            f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        per_class.append(files)
    return names, per_class


def _scan_structure(root: Path) -> DatasetLayout:
    """The layout under `root`, or a DataError for the first structural problem."""
    _check_dir(root, "dataset folder not found")
    expected = f"expected {_shown(root / SPLITS[0])} and {_shown(root / SPLITS[1])}"
    scanned = {}
    for split in SPLITS:
        _check_dir(root / split, f"missing split folder ({expected})")
        scanned[split] = _scan_split(root / split)
    first, *others = SPLITS
    for other in others:
        if scanned[other][0] != scanned[first][0]:
            raise DataError(
                f"{_shown(root)}: {first} classes {scanned[first][0]} differ from "
                f"{other} classes {scanned[other][0]}"
            )
    files = {
        split: tuple((path, label) for label, paths in enumerate(per_class) for path in paths)
        for split, (_, per_class) in scanned.items()
    }
    return DatasetLayout(root=root, classes=tuple(scanned[first][0]), files=files)


def _checked(check: Callable[[Path], str | None], paths: list[Path],
             threads: int) -> Iterator[str | None]:
    if threads <= 1:
        yield from map(check, paths)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastft-check")
    try:
        yield from pool.map(check, paths)
    finally:
        # On Ctrl-C, drop queued files instead of decoding the whole dataset first.
        pool.shutdown(wait=True, cancel_futures=True)


def find_bad_files(layout: DatasetLayout, full_decode: bool,
                   progress: bool) -> list[tuple[Path, str]]:
    """(path, reason) for every file that fails the quick check or, if
    `full_decode`, a full decode; in dataset order."""
    paths = [path for split in SPLITS for path, _ in layout.files[split]]
    check = decode_problem if full_decode else quick_problem
    threads = min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(paths)) if full_decode else 1
    results: Iterable[str | None] = tqdm(
        _checked(check, paths, threads), total=len(paths), unit="img", leave=False,
        desc="decoding images" if full_decode else "checking images",
        disable=None if progress else True,
    )
    return [(path, reason) for path, reason in zip(paths, results) if reason is not None]


def _bad_files_error(root: Path, bad: list[tuple[Path, str]]) -> DataError:
    path, reason = bad[0]
    message = f"{_shown(path)}: {reason}"
    if len(bad) > 1:
        command = f"fastft data check {shlex.quote(os.fspath(root))}"
        more = _plural(len(bad) - 1, "more bad file", "more bad files")
        message += f" (and {more}; run `{command}` to list them)"
    return DataError(message)


def _without(layout: DatasetLayout, bad: list[tuple[Path, str]]) -> DatasetLayout:
    """`layout` less the `bad` files, which it records in `dropped`."""
    gone = {path for path, _ in bad}
    files = {split: tuple(s for s in samples if s[0] not in gone) for split, samples in layout.files.items()}
    for split, samples in files.items():
        if not samples:
            raise DataError(f"{_shown(layout.root / split)}: no images left after skipping "
                            f"{_plural(len(bad), 'bad file')}")
    return dataclasses.replace(layout, files=files, dropped=tuple(bad))


def scan_dataset(root: Path, full_decode: bool = False, progress: bool = False,
                 skip_bad: bool = False) -> DatasetLayout:
    """Validate the dataset at `root` and return its layout.

    Raises a one-line DataError naming the first wrong folder or bad file; with
    `skip_bad`, bad files are left out instead and listed in `layout.dropped`.
    Only reads the dataset; never writes into it.
    """
    layout = _scan_structure(Path(root).expanduser())
    bad = find_bad_files(layout, full_decode=full_decode, progress=progress)
    if bad and skip_bad:
        return _without(layout, bad)
    if bad:
        raise _bad_files_error(layout.root, bad)
    return layout


def check_report(root: Path) -> tuple[list[str], bool]:
    """Lines for `fastft data check DIR` after decoding every file, and whether
    all decode.  Structural problems still raise DataError."""
    layout = _scan_structure(Path(root).expanduser())
    bad = find_bad_files(layout, full_decode=True, progress=True)
    classes = _plural(len(layout.classes), "class", "classes")
    lines = [f"{_shown(layout.root)}: {classes} ({', '.join(layout.classes)})"]
    total = 0
    for split in SPLITS:
        counts = layout.counts(split)
        total += sum(counts.values())
        per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
        lines.append(f"{split}: {_plural(sum(counts.values()), 'image')} ({per_class})")
    lines.extend(f"BAD {_shown(path)}: {reason}" for path, reason in bad)
    if bad:
        lines.append(f"{_plural(len(bad), 'bad file')} out of {total} images")
    else:
        lines.append(f"ok: all {total} images decode")
    return lines, not bad
