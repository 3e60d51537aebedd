"""The run folder: where a run's files go, and how `--resume` adopts its settings.

A run folder that already holds a checkpoint is never overwritten by a new run:
the user continues it with `--resume` or picks another `--out`.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastft.checkpoint import checkpoint_path
from fastft.config import TrainConfig
from fastft.errors import CheckpointError, ConfigError

# Settings a resumed run takes from the command line; all others come from the checkpoint.
RUNTIME_FIELDS = ("epochs", "out", "resume", "device", "compile", "workers")


def prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume and not cfg.out:
        raise ConfigError("--resume needs --out RUN_DIR, the folder of the run to continue")
    name = f"{cfg.strategy.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / name
    has_checkpoint = checkpoint_path(run_dir).is_file()
    if cfg.resume and not has_checkpoint:
        raise CheckpointError(f"{run_dir}: nothing to resume (no {checkpoint_path(run_dir).name})")
    if not cfg.resume and has_checkpoint:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def adopt_saved_config(given: TrainConfig, saved: dict, explicit: frozenset[str]) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's config, with the runtime fields of `given`; warn on ignored options."""
    merged = TrainConfig.from_dict(saved)
    warnings = []
    for field, value in given.to_dict().items():
        if field in RUNTIME_FIELDS:
            setattr(merged, field, value)
        elif field in explicit and saved.get(field) != value:
            warnings.append(f"ignoring --{field.replace('_', '-')} {value}: "
                            f"the run being resumed uses {saved.get(field)!r}")
    return merged, warnings
