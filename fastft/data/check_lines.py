"""`fastft data check`'s report lines, from a scanned layout and each file's decode result."""

from __future__ import annotations

import os
from pathlib import Path

from fastft.data.images import IMAGE_EXTENSIONS
from fastft.data.images import shown_path as _shown
from fastft.data.layout import SPLITS, DatasetLayout, _is_hidden, _plural


def _listed(root: Path, paths: list[Path], limit: int = 5) -> str:
    """The first `limit` paths, relative to `root`, and how many more."""
    shown = ", ".join(_shown(os.path.relpath(p, root)) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _conversion_lines(root: Path, notes: list[tuple[Path, str]]) -> list[str]:
    """One line per kind of unusual image (how load_rgb converts it), with how many and which."""
    kinds: dict[str, list[Path]] = {}
    for path, note in notes:
        kinds.setdefault(note, []).append(path)
    return [f"unusual {_plural(len(paths), 'image')} ({note}): {_listed(root, paths)}"
            for note, paths in kinds.items()]


def _ignored_lines(layout: DatasetLayout) -> list[str]:
    """One line per reason the scan passed over entries: hidden, outside any class folder
    (directly in train/ or test/), or not an image by its extension."""
    splits = {layout.root / split for split in SPLITS}
    kinds: dict[str, list[Path]] = {}
    for path in layout.ignored:
        if _is_hidden(path.name):
            why = "hidden"
        elif path.parent in splits:
            why = "outside any class folder"
        else:
            why = f"not {'/'.join(IMAGE_EXTENSIONS)}"
        kinds.setdefault(why, []).append(path)
    return [f"ignored {_plural(len(paths), 'entry', 'entries')} ({why}): {_listed(layout.root, paths)}"
            for why, paths in kinds.items()]


def check_lines(layout: DatasetLayout, problems: list[str], paths: list[Path], results: list) -> list[str]:
    """`data check`'s report: classes, images per class and split, warnings, ignored entries,
    conversions, then every folder problem and bad file, and a last line that counts them."""
    bad = [(path, problem) for path, (problem, _) in zip(paths, results) if problem is not None]
    classes = _plural(len(layout.classes), "class", "classes")
    lines = [f"{_shown(layout.root)}: {classes} ({', '.join(map(_shown, layout.classes))})"]
    for split in SPLITS:
        counts = layout.counts(split)
        per_class = ", ".join(f"{_shown(name)} {n}" for name, n in counts.items())
        lines.append(f"{split}: {_plural(sum(counts.values()), 'image')} ({per_class})")
    lines.extend(f"warning: {line}" for line in layout.warnings)
    lines.extend(_ignored_lines(layout))
    lines.extend(_conversion_lines(layout.root, [(p, n) for p, (_, n) in zip(paths, results) if n]))
    lines.extend(f"BAD {line}" for line in problems)
    lines.extend(f"BAD {_shown(path)}: {reason}" for path, reason in bad)
    files = (f"{_plural(len(bad), 'bad file')} out of {len(paths)} images" if bad else
             f"all {len(paths)} images decode" if paths else "no images found")
    lines.append(f"{_plural(len(problems), 'folder problem')}; {files}" if problems else
                 files if bad else f"ok: {files}")
    return lines
