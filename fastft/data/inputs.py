"""The images a command is given on its command line: files, folders and quoted globs."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from fastft.data.images import shown_path as _shown
from fastft.data.layout import _class_files, _no_images
from fastft.errors import DataError


def image_files(specs: list[str]) -> list[Path]:
    """The images `fastft predict` is given: each spec a file (taken as it is, whatever its name),
    a folder (its image files, walked as a class folder is: sorted, hidden entries and other
    extensions passed over, symlinked folders followed once) or a glob such as 'shots/*.jpg'
    (quoted, so the shell left it; sorted). A spec that exists is never read as a glob.
    Raises DataError (one line) for a missing path, a folder without images or a glob that
    matches nothing."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = _class_files(os.fspath(path), [], [])
            if not files:
                raise _no_images(path)
            found += files
        elif path.exists() or path.is_symlink() or not glob.has_magic(spec):
            found.append(path)  # a missing or unreadable file is named by the image check
        else:
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise DataError(f"{_shown(spec)}: no file matches this pattern")
            found += [Path(m) for m in matches if not os.path.isdir(m)] or [Path(matches[0])]
    return found
