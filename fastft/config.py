"""One dataclass holds every setting of a training run, with units.

The defaults reproduce d2l.ai chapter 13.2 ("Fine-Tuning"). `resolve` turns the
`auto` choices into concrete ones for the machine at hand, so that what lands in
`config.json` is exactly what ran.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from fastft.errors import ConfigError

LOADERS = ("auto", "torch", "dali", "cached")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LOSS_REDUCTIONS = ("sum", "mean")
DECODE_CACHES = ("auto", "on", "off")
OPTIMIZERS = ("sgd", "apex-sgd")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def default_cache_dir() -> Path:
    """Where datasets live: $XDG_CACHE_HOME/fastft, else ~/.cache/fastft."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastft"


@dataclass
class TrainConfig:
    # --- data ---
    data: str = ""                 # "" = the hotdog set (downloaded once), "synthetic", or a DIR
    image_size: int = 224          # px, side of the square training crop
    loader: str = "auto"           # auto | torch | dali | cached
    workers: int = -1              # DataLoader processes; -1 = cores / processes - 1 (max 16) on CUDA, 0 on CPU
    uint8_batches: bool = True     # torch loader: ship uint8, normalise on the device
    synth_train: int = 2000        # images, size of the "synthetic" train split
    synth_test: int = 800          # images, size of the "synthetic" test split
    skip_bad: bool = False         # drop undecodable files at startup (and say how many)
    decode_cache: str = "auto"     # DALI: keep decoded images after epoch 1; auto = when they fit
    cache_gb: float = 0.0          # GB (2^30 bytes) of device memory for --loader cached; 0 = auto (50% of free)
    cache_max_side: int = 0        # px, longest side kept by --loader cached; 0 = full size

    # --- model and strategy ---
    strategy: str = "finetune"     # finetune | frozen | hotdog | scratch | partial:K
    weights: str = ""              # imagenet | none | PATH; "" = the strategy's default

    # --- optimisation (SGD, no momentum, as in the chapter) ---
    epochs: int = 5                # passes over the train split
    batch_size: int = 128          # examples per step, GLOBAL across all processes
    lr: float = 5e-5               # per example-summed loss: the update is lr * sum of grads
    head_lr_mult: float = 10.0     # x lr for the new output layer
    weight_decay: float = 1e-3     # L2 coefficient added to every gradient
    momentum: float = 0.0          # SGD momentum; the chapter uses none
    loss_reduction: str = "sum"    # sum (the chapter) | mean (needs lr x batch, wd / batch)
    optimizer: str = "sgd"         # sgd (torch, fused on CUDA) | apex-sgd (apex FusedSGD)

    # --- speed ---
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    amp: str = "auto"              # auto | bf16 | fp16 | off
    compile: bool | None = None    # None = auto: on when the job's steps repay the compile (compile_cache)
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead and max-autotune use CUDA graphs
    channels_last: bool = True
    threads: int = 0               # torch intra-op threads; 0 = auto: cores, cgroup quota, loaders, load (fastft.threads)
    fast_frozen: bool = True       # frozen layers: BN folded, inference mode, no autograd
    sync_bn: bool = False          # multi-process: BN statistics synced across ranks
    dist_timeout_s: float = 300.0  # s, a collective waiting longer ends the job

    # --- run bookkeeping ---
    out: str = ""                  # run folder; "" = runs/<strategy>-<time>
    resume: bool = False
    save_every: int = 1            # epochs between checkpoints; the last epoch is always saved
    seed: int = 0
    tensorboard: bool = False      # per-epoch scalars (loss, accuracies, examples/sec, lr) to RUN_DIR/tb

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def validate(cfg: TrainConfig) -> None:
    """Reject settings that can only fail later, with one line that says why."""
    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.save_every >= 1, f"--save-every must be at least 1 epoch, got {cfg.save_every}"),
        (cfg.image_size >= 32, f"--image-size must be at least 32 px, got {cfg.image_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.head_lr_mult > 0, f"--head-lr-mult must be positive, got {cfg.head_lr_mult}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.loader in LOADERS, f"--loader must be one of {LOADERS}, got {cfg.loader!r}"),
        (cfg.amp in AMP_MODES, f"--amp must be one of {AMP_MODES}, got {cfg.amp!r}"),
        (cfg.decode_cache in DECODE_CACHES, f"--decode-cache must be one of {DECODE_CACHES}, got {cfg.decode_cache!r}"),
        (cfg.cache_gb >= 0, f"--cache-gb must be >= 0 (0 = auto), got {cfg.cache_gb}"),
        (cfg.cache_max_side >= 0, f"--cache-max-side must be >= 0 px (0 = full size), got {cfg.cache_max_side}"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}"),
        (cfg.compile_mode in COMPILE_MODES,
         f"--compile-mode must be one of {COMPILE_MODES}, got {cfg.compile_mode!r}"),
        (cfg.threads >= 0, f"--threads must be >= 0 (0 = auto), got {cfg.threads}"),
        (cfg.dist_timeout_s > 0, f"--dist-timeout must be positive, got {cfg.dist_timeout_s}"),
        (cfg.loss_reduction in LOSS_REDUCTIONS,
         f"--loss-reduction must be one of {LOSS_REDUCTIONS}, got {cfg.loss_reduction!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def eval_resize_px(image_size: int) -> int:
    """The chapter resizes test images to 256x256 before a 224 centre crop; keep that ratio."""
    return round(image_size * 256 / 224)
