"""The run folder: where a run's files go, and how `--resume` adopts its settings.

A run folder that already holds a checkpoint is never overwritten by a new run:
the user continues it with `--resume` or picks another `--out`.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastft.checkpoint import CHECKPOINT_NAME, checkpoint_path
from fastft.config import TrainConfig, preferred_cache_dir
from fastft.curves import CURVES_NAME
from fastft.errors import CheckpointError, ConfigError
from fastft.safe_write import cache_fallback_note, check_writable, shown
from fastft.weights import MODEL_FILE

# What a run folder holds (checkpoint.py, report.py, curves.py, weights.py).
RUN_FILES = (CHECKPOINT_NAME, MODEL_FILE, "config.json", "metrics.jsonl", "summary.json", CURVES_NAME)

# A resumed run takes these from the command line when typed there (a longer run, a moved
# dataset, another machine); every other setting comes from its checkpoint.
RUNTIME_FIELDS = ("epochs", "data", "device", "compile", "workers", "compile_mode", "fast_frozen",
                  "decode_cache", "skip_bad", "dist_timeout_s", "save_every", "cache_gb", "tensorboard")
# threads: fitted to the machine as it is now, so auto (0) again unless typed.
ALWAYS_GIVEN = ("out", "resume", "threads")

def choose_run_dir(cfg: TrainConfig) -> Path:
    """The run's folder: --out, else runs/STRATEGY-TIME. Raises ConfigError / CheckpointError for a
    --resume with nothing to resume or a new run over a saved one, WriteError for a folder that
    cannot be written (read-only, not permitted); each before any data or model work."""
    if cfg.resume and not cfg.out:
        raise ConfigError("--resume needs --out RUN_DIR, the folder of the run to continue")
    name = f"{cfg.strategy.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / name
    has_checkpoint = checkpoint_path(run_dir).is_file()
    if cfg.resume and not has_checkpoint:
        raise CheckpointError(f"{run_dir}: nothing to resume (no {checkpoint_path(run_dir).name})")
    if not cfg.resume and has_checkpoint:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    kept = [] if cfg.resume else earlier_results(run_dir)
    if kept:  # a finished run whose checkpoint was deleted to save room is still a run: never overwrite it
        raise ConfigError(f"{run_dir} already holds {', '.join(kept)} of an earlier run; choose another --out")
    # Every file of the run goes here: a read-only place is said now, not after an epoch's work.
    check_writable(run_dir, f"--out {shown(run_dir)}" if cfg.out else f"run folder {shown(run_dir)}")
    return run_dir  # created once the run is set up, so a failed start leaves no empty folder


def earlier_results(run_dir: Path) -> list[str]:
    """The files in `run_dir` that hold an earlier run's results: model.safetensors, summary.json, a
    metrics.jsonl with an epoch in it. A config.json alone (a run stopped before its first epoch
    ended) holds none: running the same command again there is what that stop tells the user."""
    names = [name for name in (MODEL_FILE, "summary.json") if (run_dir / name).exists()]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        names.append(metrics.name)
    return names


def adopt_saved_config(given: TrainConfig, saved: dict,
                       typed: frozenset[str] | None) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's config plus the runtime fields the user typed; warn on ignored options.

    `typed` names the options given on the command line; None means every field of `given`.
    """
    merged = TrainConfig.from_dict(saved)
    warnings = []
    for field, value in given.to_dict().items():
        was_typed = typed is None or field in typed
        if field in ALWAYS_GIVEN or (field in RUNTIME_FIELDS and was_typed):
            setattr(merged, field, value)
        elif was_typed and saved.get(field) != value:
            warnings.append(f"ignoring --{field.replace('_', '-')} {value}: "
                            f"the run being resumed uses {saved.get(field)!r}")
    return merged, warnings


def cache_notes() -> list[str]:
    """A warning line where fastft's cache folder cannot be written and a temporary one is used."""
    note = cache_fallback_note(preferred_cache_dir())
    return [note] if note else []
