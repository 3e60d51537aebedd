"""Data: where the dataset lives, whether it is sound, and the backend that batches it.

Backends sit side by side with one small interface (`classes`, `train_size`,
`test_size`, `train_batches(epoch)`, `test_batches()`, `steps_per_epoch()`):
torch_loader (PIL + DataLoader, the chapter's reference) and dali_loader.
"""

from __future__ import annotations

from pathlib import Path

from fastft.config import TrainConfig, default_cache_dir
from fastft.errors import ConfigError

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


def dali_available() -> bool:
    """True when nvidia.dali imports (wheels exist for Linux only)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: a wheel whose native libraries do not load
        return False
    return True


def build_loaders(cfg: TrainConfig, layout, rt):
    """The backend for `--loader` on runtime `rt` (device, AMP dtype, layout, workers, rank);
    `auto` is DALI whenever it imports, else torch."""
    if cfg.batch_size % rt.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not divide over {rt.world_size} processes")
    batch_per_rank = cfg.batch_size // rt.world_size
    if cfg.loader == "dali" and not dali_available():
        raise ConfigError("--loader dali: nvidia.dali does not import here; "
                          "pip install nvidia-dali-cuda120, or use --loader torch")
    if cfg.loader == "dali" or (cfg.loader == "auto" and dali_available()):
        from fastft.data.dali_loader import DaliLoaders
        return DaliLoaders(layout, cfg.image_size, batch_per_rank, rt, cfg.seed, cfg.decode_cache)
    from fastft.data.torch_loader import TorchLoaders
    return TorchLoaders(layout, cfg.image_size, batch_per_rank, rt.workers, cfg.seed,
                        rt.rank, rt.world_size, pin_memory=rt.device.type == "cuda")
