"""Data: where the dataset lives, whether it is sound, and the backend that batches it.

Backends sit side by side with one small interface (`classes`, `train_size`,
`test_size`, `train_batches(epoch)`, `test_batches()`, `steps_per_epoch()`):
torch_loader (PIL + DataLoader, the chapter's reference), dali_loader and cached_loader.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from fastft.config import TrainConfig, default_cache_dir
from fastft.errors import ConfigError

if TYPE_CHECKING:
    from fastft.models.base import Preprocessing

SYNTHETIC = "synthetic"


def resolve_data_dir(cfg: TrainConfig, cache_dir: Path | None = None) -> Path:
    """`--data`: "" = the chapter's hotdog set (downloaded once), "synthetic", or a folder."""
    cache_dir = cache_dir or default_cache_dir()
    if cfg.data == SYNTHETIC:
        from fastft.data.synth import cached_synthetic
        return cached_synthetic(cache_dir, n_train=cfg.synth_train, n_test=cfg.synth_test)
    if not cfg.data:
        from fastft.data.download import download_hotdog
        return download_hotdog(cache_dir / "hotdog")
    return Path(cfg.data).expanduser()


def existing_data_dir(cfg: TrainConfig, cache_dir: Path | None = None) -> Path | None:
    """resolve_data_dir's folder where it already holds train/ and test/, else None: nothing is
    generated or downloaded here."""
    cache_dir = cache_dir or default_cache_dir()
    if cfg.data == SYNTHETIC:
        from fastft.data.synth import synthetic_root
        root = synthetic_root(cache_dir, n_train=cfg.synth_train, n_test=cfg.synth_test)
    else:
        root = Path(cfg.data).expanduser() if cfg.data else cache_dir / "hotdog"
    return root if (root / "train").is_dir() and (root / "test").is_dir() else None


def start_decode_ahead(cfg: TrainConfig, cache_dir: Path | None = None):
    """A DecodeAhead child (data.decode_ahead) decoding the run's images while torch imports, where
    the images will be decoded by this process on a CPU: --loader cached or auto, --device cpu
    (or auto on a machine without NVIDIA device files), one process, not --resume (its data is
    the checkpoint's), the folder already there, and torch not imported yet (fork is safe
    before its thread pools exist: a library caller that has torch gets None). None otherwise."""
    if "torch" in sys.modules:
        return None
    world = os.environ.get("WORLD_SIZE", "1")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not any(Path("/dev").glob("nvidia[0-9]*")))
    if cfg.loader not in ("cached", "auto") or not on_cpu or cfg.resume or world not in ("", "1"):
        return None
    root = existing_data_dir(cfg, cache_dir)
    if root is None:
        return None
    from fastft.data.decode_ahead import DecodeAhead
    return DecodeAhead.start(root)


def dali_available() -> bool:
    """True when nvidia.dali imports (wheels exist for Linux only)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: a wheel whose native libraries do not load
        return False
    return True


def check_train_split(n_train: int, world_size: int) -> None:
    """Every process needs a training image of its own (padding would only repeat another's)."""
    if n_train < world_size:
        raise ConfigError(f"{n_train} train image(s) leave some of {world_size} processes without one; "
                          f"use at most {n_train} processes")


# The fewest values per channel a train-mode BatchNorm may normalise over. At 32 px ResNet-18's
# last stage is 1x1, so its BNs see one value per image in the batch; with two, each output is
# +-1 whatever the input, and the gradients through that blow the weights up. Measured: one
# epoch, synthetic set (24 train, 48 test), 32 px, fp32, lr 5e-5, seeds 0/1/2, conv1 max |w|
# after the epoch (0.096 before from random init, 0.109 from an ImageNet-shaped file):
#   values  full batches of v (24 images)    ragged last batch of v (24 + v at batch 8)
#   2       0.47 1.08 1.17 | 0.45 4.12 0.78  0.52 0.38 3.38 | 0.41 1.66 0.11
#   3       0.11 0.13 0.11 | 0.12 0.11 0.11  0.10 0.10 0.10 | 0.11 0.11 0.12
#   4       0.10 0.10 0.10 | 0.11 0.11 0.11  0.10 0.10 0.10 | 0.11 0.11 0.11
#   6, 8    0.10 0.10 0.10 | 0.11 0.11 0.11  (as 4; 8 = no ragged batch)
# Two values blow up in one epoch (4-40x); three still grow conv1 11-33% in 8 steps from random
# init; four and more match batch 8. Test accuracy after one epoch is near chance (0.3-0.7)
# for every v and says nothing either way.
MIN_BN_VALUES = 4


def min_train_batch(cfg: TrainConfig, synced_processes: int = 1, downsample: int = 32) -> int:
    """Fewest images per process a train step may hold at cfg.image_size: MIN_BN_VALUES spread over
    the last stage's ceil(image_size / downsample)^2 positions per image and the processes a
    SyncBatchNorm pools over. `downsample`: px of input per last-stage position (ResNet halves
    the side 5 times: 32); 0 = no BatchNorm trains (a model without BN, or every stage frozen,
    which --strategy frozen and probe always mean): 1."""
    from fastft.strategy import ALL, get_strategy
    if downsample <= 0 or get_strategy(cfg.strategy).frozen_stages == ALL:
        return 1
    side = math.ceil(cfg.image_size / downsample)
    return max(1, math.ceil(MIN_BN_VALUES / (side * side * synced_processes)))


def check_batch_norm(cfg: TrainConfig, batch_sizes: set[int], synced_processes: int = 1,
                     batch_per_rank: int | None = None, downsample: int = 32) -> None:
    """Stop up front where a train step would give a train-mode BatchNorm fewer than MIN_BN_VALUES
    values per channel (1 makes torch raise inside the model; a few make the weights blow up).

    `batch_sizes`: images per process in the train steps, after the loader dropped a ragged last
    batch below min_train_batch (so what is left is a full batch, or the only, partial, batch);
    `synced_processes`: processes a SyncBatchNorm pools its statistics over; `batch_per_rank`:
    a full batch per process (default --batch-size), to name the cause; `downsample` as in
    min_train_batch. Raises ConfigError.
    """
    smallest, needed = min(batch_sizes), min_train_batch(cfg, synced_processes, downsample)
    if smallest >= needed:
        return
    side = math.ceil(cfg.image_size / downsample)
    values = smallest * side * side * synced_processes
    full = batch_per_rank or cfg.batch_size
    cause = (f"--batch-size {cfg.batch_size} gives {full} image(s) per process per step" if smallest == full else
             f"the train split gives each process only {smallest} image(s), one batch smaller than "
             f"--batch-size {cfg.batch_size}")
    bigger = downsample * math.ceil(math.sqrt(MIN_BN_VALUES / (smallest * synced_processes)))
    raise ConfigError(f"{cause}: at --image-size {cfg.image_size} the last stage is {side}x{side}, so its "
                      f"BatchNorms would normalise {values} value(s) per channel, fewer than the "
                      f"{MIN_BN_VALUES} that keep training stable; use at least {needed} images per "
                      f"process, --image-size {bigger}, or --strategy frozen")


def build_loaders(cfg: TrainConfig, layout, rt, preprocessing: Preprocessing | None = None,
                  bn_downsample: int = 32, ahead=None):
    """The backend for `--loader` on runtime `rt` (device, AMP dtype, layout, workers, rank);
    `auto` is cached where the decoded set fits its budget (image headers decide, before any
    decode), else DALI whenever it imports, else torch.

    `preprocessing`: the model's eval resize, mean, std and interpolation (the engine passes
    spec.preprocessing().at_size(cfg.image_size)); every backend resizes, crops and normalises
    with it, taken at cfg.image_size. None: ResNet-18's, DEFAULT_PREPROCESSING (fastft.models
    imports torch, which this module does not, so the default is resolved here).
    `bn_downsample`: as min_train_batch's `downsample` (Strategy.bn_downsample gives it).
    `ahead`: start_decode_ahead's child, whose images the cached loader takes (the caller closes it)."""
    from fastft.models.base import DEFAULT_PREPROCESSING
    prep = (preprocessing or DEFAULT_PREPROCESSING).at_size(cfg.image_size)
    _check_split(cfg, layout, rt)
    batch_per_rank = cfg.batch_size // rt.world_size
    plan = _cached_plan(cfg, layout, rt) if cfg.loader in ("cached", "auto") else None
    synced = rt.world_size if cfg.sync_bn and rt.distributed else 1
    min_batch = min_train_batch(cfg, synced, bn_downsample)  # a smaller ragged last batch is dropped (not DALI's: it drops all)
    # Under DDP every process must pick the same backend: cached only where it fits everywhere.
    from fastft.distributed import all_true  # torch: not imported by `fastft data`
    fits = plan is not None and all_true(plan.fits, rt.device)
    if plan is not None and (cfg.loader == "cached" or fits):
        from fastft.data.cached_loader import CachedLoaders
        loaders = CachedLoaders(layout, cfg.image_size, batch_per_rank, rt, cfg.seed, plan=plan,
                                max_side=cfg.cache_max_side, drop_ragged=rt.compile, progress=rt.is_main,
                                threads=max(cfg.workers, 0), min_batch=min_batch, preprocessing=prep,
                                ahead=ahead.collect() if ahead is not None else None)
    elif cfg.loader == "dali" or (cfg.loader == "auto" and dali_available()):
        from fastft.data.dali_loader import DaliLoaders, DaliOptions
        # A typed --workers N is DALI's thread count; untyped (-1), DALI's own default.
        loaders = DaliLoaders(layout, cfg.image_size, batch_per_rank, rt, cfg.seed, cfg.decode_cache,
                              DaliOptions(threads=max(cfg.workers, 0)), preprocessing=prep)
    else:
        from fastft.data.torch_loader import TorchLoaders
        loaders = TorchLoaders(layout, cfg.image_size, batch_per_rank, rt.workers, cfg.seed,
                               rt.rank, rt.world_size, pin_memory=rt.device.type == "cuda",
                               rt=rt, drop_ragged=rt.compile, uint8=cfg.uint8_batches, min_batch=min_batch,
                               preprocessing=prep)
    check_batch_norm(cfg, loaders.train_batch_sizes(), synced, batch_per_rank, bn_downsample)
    return _auto_noted(loaders, plan) if cfg.loader == "auto" else loaders


def _check_split(cfg: TrainConfig, layout, rt) -> None:
    """One line (ConfigError) for a batch that does not divide over the processes, a train split
    smaller than the processes, or --loader dali where DALI does not import."""
    from fastft.config import batch_split_problem
    split_problem = batch_split_problem(cfg.batch_size, rt.world_size)  # the CLI says it before torch loads
    if split_problem:
        raise ConfigError(split_problem)
    check_train_split(len(layout.files["train"]), rt.world_size)
    if cfg.loader == "dali" and not dali_available():
        raise ConfigError("--loader dali: nvidia.dali does not import here; "
                          "pip install nvidia-dali-cuda120, or use --loader torch")


def _cached_plan(cfg: TrainConfig, layout, rt):
    """--loader cached's size, from image headers, against its budget (no pixel decoded yet)."""
    from fastft.data.cached_loader import plan_cache
    from fastft.distributed import launch_from_env
    return plan_cache(layout, cfg.image_size, rt, cfg.cache_gb, cfg.cache_max_side,
                      processes_here=launch_from_env().local_world_size)


def _auto_noted(loaders, plan):
    """`--loader auto` says what it picked and why, first among the backend's describe() lines
    (the engine prints those): cached where the decoded set fits its budget, else DALI or torch."""
    need = f"the decoded set needs {plan.need_mb:.0f} MB of a {plan.budget_bytes / 2**20:.0f} MB budget " \
           f"({plan.budget_source})"
    line = (f"loader auto: cached, {need}" if loaders.name == "cached" else
            f"loader auto: {loaders.name}, not cached: {need}; --cache-gb or --cache-max-side changes that")
    lines = loaders.describe
    loaders.describe = lambda: [line, *lines()]  # this instance only
    return loaders
