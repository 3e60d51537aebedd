"""What `fastft eval` reads: the model source and the one split it scores.

The model: RUN_DIR or its checkpoint.pt (fastft.checkpoint), or a run's model.safetensors
(fastft.weights: tensors, and metadata with the model's name, classes, preprocessing and epoch).
The split: DIR/SPLIT, or DIR itself where it is one split's class folders. Only that split is
read, so a folder of test images alone will do; its class folders are matched to the run's
classes by name (the run's, not another split's). The scan lists files as
fastft.data.layout.scan_dataset lists a split, through layout's own folder walk, so the order
and the links followed are the same as training's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastft.checkpoint import load_checkpoint
from fastft.config import TrainConfig
from fastft.data.images import needs_dali_copy, quick_problem, shown_path
from fastft.data.layout import DatasetLayout
from fastft.errors import CheckpointError, DataError
from fastft.weights import is_safetensors, read_model_file


def load_source(path: Path, data_given: bool) -> dict:
    """The model to score, as a checkpoint's keys (model, classes, config, epoch), on the CPU:
    RUN_DIR or its checkpoint.pt, or a run's model.safetensors (tensors and metadata; the config
    from config.json beside it, needed only for the data when --data is not given).
    Raises CheckpointError or WeightsError (one line) for a missing or unreadable source."""
    if not (path.is_file() and is_safetensors(path)):
        return load_checkpoint(path)  # mapped to the CPU, whatever device trained it
    from fastft.predict import check_card
    tensors, card = read_model_file(path)
    name, prep = check_card(path, card)  # classes, the model's name and its preprocessing
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) and not data_given:
        raise CheckpointError(f"{shown_path(path)}: no readable config.json beside it to name the run's data; "
                              f"pass --data DIR, or --checkpoint RUN_DIR")
    # The card's model and preprocessing win over config.json's: they describe these tensors.
    return {"model": tensors, "classes": card["classes"], "epoch": card.get("epoch", "?"),
            "preprocessing": prep.to_dict(),
            "config": {**(config if isinstance(config, dict) else {}), "image_size": prep.image_size, "model": name}}


def split_folder(data_dir: Path, split: str, classes: list[str]) -> tuple[Path, str | None]:
    """The folder of class folders to score and the split it is: DIR/SPLIT, or (DIR, None) where
    DIR is itself one split (it holds neither train/ nor test/, and a folder named after a run
    class). Only that split need exist. Raises DataError (one line) otherwise."""
    from fastft.data.layout import _check_dir, _unreadable
    from fastft.data.name_twins import case_hint
    _check_dir(data_dir, "dataset folder not found")
    folder = data_dir / split
    if folder.exists():
        _check_dir(folder, "the split to evaluate")
        return folder, split
    try:
        with os.scandir(data_dir) as entries:
            names = {e.name for e in entries if e.is_dir() and not e.name.startswith(".")}
    except OSError as err:
        raise _unreadable(err) from err
    if not names & {"train", "test"} and names & set(classes):
        return data_dir, None
    raise DataError(f"{shown_path(folder)}: missing split folder (expected {shown_path(folder / 'CLASS')}/*.jpg, "
                    f"or --data naming one split's class folders{case_hint(data_dir, split)})")


def scan_split(folder: Path, classes: list[str]) -> tuple[tuple[tuple[Path, int], ...], list[str]]:
    """(path, run class index) of each image under `folder`'s class folders, in the order
    scan_dataset lists a split (ImageFolder's, by the data's own sorted class names), and warning
    lines: run classes without images, symlinks not followed. Raises DataError (one line) for a
    class folder the run does not know, a split without images, or a file that is not a
    complete image (layout's quick check, as scan_dataset makes it)."""
    from fastft.data.layout import _class_files, _class_names, _no_images
    ignored, skipped = [], []
    names = _class_names(folder, ignored)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise DataError(f"{shown_path(folder / unknown[0])}: class {unknown[0]!r} is not one of the run's "
                        f"classes ({', '.join(classes)}), so the model cannot predict it")
    dirs = {name: os.path.join(folder, name) for name in names}
    roots = {os.path.realpath(path): name for name, path in dirs.items()}
    found = {name: _class_files(path, ignored, skipped, roots) for name, path in dirs.items()}
    index = {name: i for i, name in enumerate(classes)}
    files = tuple((path, index[name]) for name in names for path in found[name])
    if not files:
        raise _no_images(folder, " in any class folder")
    bad = [(path, why) for path, _ in files if (why := quick_problem(path)) is not None]
    if bad:
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(f"{shown_path(bad[0][0])}: {bad[0][1]}{more}")
    return files, skipped + [f"{shown_path(folder)}: no images of the run's class {name!r}; its row stays empty"
                             for name in classes if not found.get(name)]


def split_layout(data_dir: Path, split: str, classes: list[str]) -> tuple[DatasetLayout, list[str], str | None]:
    """A layout in the run's class order whose test split (the one every backend reads with the
    eval transform) is the scored split's files, its train split that split's first file: the
    backends' constructors want one, and the cached loader decodes its train split up front,
    which eval never reads. Also the warnings, and the split's name (None: DIR is the split)."""
    folder, name = split_folder(data_dir, split, classes)
    files, warnings = scan_split(folder, classes)
    copies = frozenset(path for path, _ in files if needs_dali_copy(path))
    layout = DatasetLayout(root=data_dir, classes=tuple(classes), files={"train": files[:1], "test": files},
                           warnings=tuple(warnings), dali_copies=copies)
    return layout, warnings, name


def dataset_folder(data: str | None, config: dict) -> Path:
    """The dataset folder: `data` (--data) where given, else the run's own, resolved as training
    resolves --data (the synthetic set and the hotdog set live in fastft's cache)."""
    from fastft.data import resolve_data_dir
    values = {**config, "data": data} if data is not None else config
    return resolve_data_dir(TrainConfig.from_dict(values))
