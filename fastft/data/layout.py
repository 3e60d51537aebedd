"""Find and validate the dataset before any training starts.

torchvision's ImageFolder reports a bad layout with a generic exception and a
bad image only when a worker reaches it mid-epoch.  Scanning up front lets us
name the exact folder or file that is wrong, in one line, before the user has
waited for a model download or a first epoch.  The sample order matches
ImageFolder's so labels mean the same thing whichever one a caller uses.

Classes come from the train split; test labels index the same list by name, so
a test split may lack a class (a warning) but not add one (an error: the head
could never predict it). An empty class folder is an error in train (a class
the head never sees) and a warning in test.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fastft.config import default_cache_dir
from fastft.data.images import IMAGE_EXTENSIONS, decode_problem, image_note, needs_dali_copy, quick_problem
from fastft.data.images import rgb_copy, utf8_link, utf8_name
from fastft.data.images import shown_path as _shown
from fastft.data.name_twins import case_hint, twin_warnings, unknown_test_class
from fastft.errors import DataError
from fastft.safe_write import writing

SPLITS = ("train", "test")
# Decoding is mostly C code that releases the GIL; a few threads are enough
# to keep disks and cores busy without oversubscribing a laptop.
_MAX_DECODE_THREADS = 8


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    classes: tuple[str, ...]  # the train split's class folders, sorted; labels index it in every split
    files: dict[str, tuple[tuple[Path, int], ...]]
    # (path, reason) of each bad file that scan_dataset(skip_bad=True) left out.
    dropped: tuple[tuple[Path, str], ...] = ()
    missing_in_test: tuple[str, ...] = ()  # train classes without a test image
    warnings: tuple[str, ...] = ()         # one-line notes for the run's log (missing classes, empty folders)
    ignored: tuple[Path, ...] = ()         # hidden entries and non-image files the scan passed over
    # Files DALI's decoder reads unlike load_rgb (images.needs_dali_copy): DALI gets RGB PNG copies.
    dali_copies: frozenset[Path] = frozenset()

    def counts(self, split: str) -> dict[str, int]:
        """Number of files per class in `split`, in class order."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.files[split]:
            counts[self.classes[label]] += 1
        return counts

    def dali_files(self, split: str, cache_dir: Path | None = None) -> tuple[tuple[Path, int], ...]:
        """files[split] with each of `dali_copies` replaced by its RGB PNG copy under
        cache_dir/converted (default: fastft's cache folder), made on first use, and each name
        that is not UTF-8 (DALI takes no other) by a UTF-8 link to the same file there.
        Raises DataError, naming the original, for a file load_rgb cannot map; WriteError where
        the copy cannot be written."""
        files = self.files[split]
        if not self.dali_copies and all(utf8_name(path) for path, _ in files):
            return files
        cache_dir = cache_dir or default_cache_dir()
        with writing(cache_dir / "converted"):  # a full disk: one WriteError line (fastft.safe_write)
            return tuple((self._dali_path(path, cache_dir), label) for path, label in files)

    def _dali_path(self, path: Path, cache_dir: Path) -> Path:
        """What DALI reads for `path`: its RGB copy, a UTF-8 link to it, or the file itself."""
        if path in self.dali_copies:
            return rgb_copy(path, cache_dir)
        return path if utf8_name(path) else utf8_link(path, cache_dir)


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


def _class_names(split_dir: Path, ignored: list[Path]) -> list[str]:
    """Class folder names, sorted as ImageFolder's find_classes sorts them;
    other entries of `split_dir` are added to `ignored`."""
    # Unlike ImageFolder we skip hidden folders: a stray .ipynb_checkpoints
    # would otherwise become a class and shift every label after it.
    try:
        with os.scandir(split_dir) as entries:
            found = [(e.name, e.is_dir() and not _is_hidden(e.name)) for e in entries]
    except OSError as err:
        raise _unreadable(err) from err
    names = sorted(name for name, is_class in found if is_class)
    if names:
        ignored.extend(split_dir / name for name, is_class in sorted(found) if not is_class)
        return names
    stray = [name for name, _ in found if _is_image_name(name)]
    hint = f"; found {_plural(len(stray), 'image')} directly inside it" if stray else ""
    raise DataError(
        f"{_shown(split_dir)}: no class folders "
        f"(expected {_shown(split_dir / 'CLASS')}/*.jpg{hint})"
    )


def _loop_reason(real: str, root: str, seen: set[str], class_roots: dict[str, str]) -> str | None:
    """Why a folder whose real path is `real`, met while walking the class folder `root`
    (a real path), must not be walked, or None. `seen`: real paths walked for this class."""
    if real == root or root.startswith(real + os.sep):
        return "it leads back to this class folder or one above it (a loop)"
    for other, name in class_roots.items():
        if other != root and (real == other or real.startswith(other + os.sep)):
            return f"it points into class folder {_shown(name)}, whose images belong to that class"
    if real in seen:
        return "its folder is already read through another path"
    return None


def _class_files(class_dir: str, ignored: list[Path], skipped: list[str],
                 class_roots: dict[str, str] | None = None) -> list[Path]:
    """Image files under `class_dir`, in the order ImageFolder's make_dataset uses;
    hidden folders and files that are not images are added to `ignored`.

    Symlinked folders are followed (a class folder may itself be a link), but never one
    that leads back to this class folder or above it, into another class folder
    (`class_roots`: real path -> shown name), or to a folder already read: os.walk's
    followlinks would otherwise count every image reachable through a loop again and
    again, under this class's label. A warning line for each such link goes to `skipped`.
    """
    def fail(err: OSError) -> None:
        raise _unreadable(err)

    root = os.path.realpath(class_dir)
    reals, seen = {class_dir: root}, {root}
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        # Pruning in place keeps the walk out of .git, .ipynb_checkpoints etc.
        ignored.extend(Path(dirpath, d) for d in sorted(dirnames) if _is_hidden(d))
        kept = []
        # Real folders first, so a link to a folder of this class is the copy left out; then by name.
        for name in sorted((d for d in dirnames if not _is_hidden(d)),
                           key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
            full = os.path.join(dirpath, name)
            link = os.path.islink(full)
            real = os.path.realpath(full) if link else os.path.join(reals[dirpath], name)
            why = _loop_reason(real, root, seen, class_roots or {})
            if why:
                what = f"symlink to {_shown(real)}" if link else "folder"
                skipped.append(f"{_shown(full)}: {what} not followed; {why}")
                continue
            seen.add(real)
            reals[full] = real
            kept.append(name)
        dirnames[:] = kept
        found.append((dirpath, filenames))
    found.sort()
    files = []
    for dirpath, filenames in found:
        for name in sorted(filenames):
            # Built with os.path.join so paths are the same strings ImageFolder makes.
            (files if _is_image_name(name) else ignored).append(Path(os.path.join(dirpath, name)))
    return files


def _scan_splits(root: Path, names: dict[str, list[str]], ignored: list[Path],
                 skipped: list[str]) -> dict[str, dict[str, list[Path]]]:
    """Image files per class folder (`names`: a split's class folders) of each split present in
    `names`, in class order; a list may be empty."""
    folders = {split: {name: os.path.join(root / split, name) for name in found} for split, found in names.items()}
    class_roots = {os.path.realpath(folder): f"{split}/{name}"
                   for split, per_class in folders.items() for name, folder in per_class.items()}
    return {split: {name: _class_files(folder, ignored, skipped, class_roots)
                    for name, folder in per_class.items()} for split, per_class in folders.items()}


def _no_images(folder: Path, why: str = "") -> DataError:
    return DataError(f"{_shown(folder)}: no images{why} "
                     f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})")


def _test_gaps(root: Path, classes: tuple[str, ...],
               test: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
    """Train classes without a test image, and a warning line for each gap."""
    missing = [name for name in classes if not test.get(name)]
    lines = [f"{_shown(root / 'test' / name)}: empty class folder; the test split has no {name!r} images"
             for name in missing if name in test]
    absent = [name for name in missing if name not in test]
    if absent:
        kind = "class" if len(absent) == 1 else "classes"
        lines.append(f"{_shown(root / 'test')}: no folder for train {kind} {', '.join(absent)}; "
                     f"test metrics cover the other classes only")
    return missing, lines


def _split_names(root: Path, ignored: list[Path], problems: list[str]) -> dict[str, list[str]]:
    """Each split's class folder names, for the splits that have any; a problem line for each other."""
    expected = f"expected {_shown(root / SPLITS[0])} and {_shown(root / SPLITS[1])}"
    names = {}
    for split in SPLITS:
        try:
            _check_dir(root / split, f"missing split folder ({expected}{case_hint(root, split)})")
            names[split] = _class_names(root / split, ignored)
        except DataError as err:
            problems.append(str(err))
    return names


def _structure(root: Path) -> tuple[DatasetLayout, list[str]]:
    """The layout under `root` and a line for every structural problem found (an empty list: the
    layout is sound). With problems the layout holds what could be read, for `data check` to
    decode: classes are then train's (test's where train is missing) plus unknown test classes.
    Raises DataError only when `root` itself is not a readable folder."""
    _check_dir(root, "dataset folder not found")
    ignored, skipped, problems = [], [], []
    names = _split_names(root, ignored, problems)
    scanned = _scan_splits(root, names, ignored, skipped)
    train, test = scanned.get("train"), scanned.get("test", {})
    warnings = [line for split, found in names.items() for line in twin_warnings(root / split, found)]
    # An empty train class: the head would have a class it never trains on.
    problems += [str(_no_images(root / "train" / name)) for name, paths in (train or {}).items() if not paths]
    classes = tuple(train if train is not None else test)
    extra = tuple(name for name in test if name not in classes)
    problems += [unknown_test_class(root, name, classes) for name in extra]
    if test and not any(test.values()):
        problems.append(str(_no_images(root / "test", " in any class folder")))
    missing, lines = _test_gaps(root, classes, test) if "test" in scanned and train is not None else ([], [])
    # Labels index the train classes by name, so a class keeps its label when test lacks another.
    label = {name: i for i, name in enumerate(classes + extra)}
    files = {split: tuple((path, label[name]) for name, paths in scanned.get(split, {}).items() for path in paths)
             for split in SPLITS}
    layout = DatasetLayout(root=root, classes=classes + extra if problems else classes, files=files,
                           missing_in_test=tuple(missing), warnings=tuple(warnings + skipped + lines),
                           ignored=tuple(ignored))
    return layout, problems


def _scan_structure(root: Path) -> DatasetLayout:
    """The layout under `root`, or a DataError naming the first structural problem (and how many more)."""
    layout, problems = _structure(root)
    if problems:
        more = ""
        if len(problems) > 1:
            command = f"fastft data check {shlex.quote(os.fspath(root))}"
            more = f" (and {_plural(len(problems) - 1, 'more folder problem')}; run `{command}` to list them)"
        raise DataError(problems[0] + more)
    return layout


def check_classes(layout: DatasetLayout) -> None:
    """Raise a one-line DataError for a dataset with one class: training would reach loss 0 and
    accuracy 1 while learning nothing. For training and `data check`; the scan itself accepts
    one class, which loader tests use."""
    if len(layout.classes) < 2:
        raise DataError(f"{_shown(layout.root / 'train')}: only one class folder ({layout.classes[0]}); "
                        f"a classifier needs at least 2 classes, one folder each")


def _checked(check: Callable[[Path], object], paths: list[Path], threads: int) -> Iterator:
    if threads <= 1:
        yield from map(check, paths)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastft-check")
    try:
        yield from pool.map(check, paths)
    finally:
        # On Ctrl-C, drop queued files instead of decoding the whole dataset first.
        pool.shutdown(wait=True, cancel_futures=True)


def _each_file(check: Callable[[Path], object], paths: list[Path], decoding: bool, progress: bool) -> list:
    """check(path) for every path, in order; decoding checks run on a few threads."""
    threads = min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(paths)) if decoding else 1
    return list(tqdm(_checked(check, paths, max(threads, 1)), total=len(paths), unit="img", leave=False,
                     desc="decoding images" if decoding else "checking images",
                     disable=None if progress else True))


def _all_paths(layout: DatasetLayout) -> list[Path]:
    return [path for split in SPLITS for path, _ in layout.files[split]]


def find_bad_files(layout: DatasetLayout, full_decode: bool,
                   progress: bool) -> list[tuple[Path, str]]:
    """(path, reason) for every file that fails the quick check or, if
    `full_decode`, a full decode; in dataset order."""
    paths = _all_paths(layout)
    results = _each_file(decode_problem if full_decode else quick_problem, paths, full_decode, progress)
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
    """`layout` less the `bad` files, which it records in `dropped`; a train class
    left without images is an error, a test class left without images a warning."""
    gone = {path for path, _ in bad}
    files = {split: tuple(s for s in samples if s[0] not in gone) for split, samples in layout.files.items()}
    left = f"no images left after skipping {_plural(len(bad), 'bad file')}"
    labels = {split: {label for _, label in samples} for split, samples in files.items()}
    for i, name in enumerate(layout.classes):
        if i not in labels["train"]:
            raise DataError(f"{_shown(layout.root / 'train' / name)}: {left}")
    if not files["test"]:
        raise DataError(f"{_shown(layout.root / 'test')}: {left}")
    missing = tuple(name for i, name in enumerate(layout.classes) if i not in labels["test"])
    lines = [f"{_shown(layout.root / 'test' / name)}: {left}; the test split has no {name!r} images"
             for name in missing if name not in layout.missing_in_test]
    return dataclasses.replace(layout, files=files, dropped=tuple(bad), missing_in_test=missing,
                               warnings=layout.warnings + tuple(lines))


def scan_dataset(root: Path, full_decode: bool = False, progress: bool = False,
                 skip_bad: bool = False) -> DatasetLayout:
    """Validate the dataset at `root` and return its layout.

    Raises a one-line DataError naming the first wrong folder or bad file; with
    `skip_bad`, bad files are left out instead and listed in `layout.dropped`.
    Files DALI would decode unlike load_rgb are listed in `layout.dali_copies`.
    Only reads the dataset; never writes into it.
    """
    layout = _scan_structure(Path(root).expanduser())
    bad = find_bad_files(layout, full_decode=full_decode, progress=progress)
    if bad and not skip_bad:
        raise _bad_files_error(layout.root, bad)
    if bad:
        layout = _without(layout, bad)
    # Reads headers of non-JPEG/PNG files only, which are rare in photo folders.
    copies = frozenset(path for path in _all_paths(layout) if needs_dali_copy(path))
    return dataclasses.replace(layout, dali_copies=copies)


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(why `path` is bad, how load_rgb converts it): at most one is not None."""
    problem = decode_problem(path)
    return problem, (image_note(path) if problem is None else None)


def check_report(root: Path) -> tuple[list[str], bool]:
    """Lines for `fastft data check DIR`, and whether the dataset is sound, in one pass: every
    folder problem (a missing split, an empty train class, a test class train lacks, a single
    class...), then every file decoded: images per class and split, classes a split lacks, entries
    the scan ignored, images load_rgb converts (16-bit, CMYK, alpha, EXIF-rotated...) and every
    bad file. Raises DataError (one line) only when DIR itself is missing or unreadable."""
    from fastft.data.check_lines import check_lines  # it formats layouts: imported here, no cycle
    layout, problems = _structure(Path(root).expanduser())
    if not problems:
        try:
            check_classes(layout)
        except DataError as err:
            problems.append(str(err))
    paths = _all_paths(layout)
    results = _each_file(_inspect, paths, decoding=True, progress=True)
    lines = check_lines(layout, problems, paths, results)
    return lines, not problems and all(problem is None for problem, _ in results)
