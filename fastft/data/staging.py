"""Publishing a folder built beside its target: readers see all of it or none of it."""

from __future__ import annotations

import os
from pathlib import Path


def is_vacant(target: Path) -> bool:
    """True if `target` is missing or an empty folder: nothing a rename would destroy."""
    return not target.exists() or (target.is_dir() and not any(target.iterdir()))


def move_into_place(built: Path, target: Path) -> None:
    """Rename `built` to a vacant `target` in one step (raises OSError on failure)."""
    if target.is_dir():
        target.rmdir()  # vacant by contract; Windows cannot rename onto a folder
    os.replace(built, target)
