"""One dataclass holds every setting of a training run, with units.

The defaults reproduce d2l.ai chapter 13.2 ("Fine-Tuning"). `resolve` turns the
`auto` choices into concrete ones for the machine at hand, so that what lands in
`config.json` is exactly what ran.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastft.errors import ConfigError

LOADERS = ("auto", "torch", "dali", "cached")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LOSS_REDUCTIONS = ("sum", "mean")
DECODE_CACHES = ("auto", "on", "off")
OPTIMIZERS = ("sgd", "apex-sgd")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")
# strategy.REGISTRY's names (a test keeps the two equal), here so that a typo is caught before torch loads.
STRATEGY_NAMES = ("finetune", "frozen", "probe", "hotdog", "scratch")
PARTIAL_STAGES = 4  # resnet18's stages: partial:K freezes the stem and the first K (each model says its own count)
DEVICE_FORM = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)")
SYNTHETIC = "synthetic"  # --data's name for the generated set (fastft.data.SYNTHETIC)
# Seeds go to torch.manual_seed (64 bits), numpy's SeedSequence and DALI (int64); 0..2^32-1 is the
# range numpy's legacy seed and most tools take, and leaves room for seed + rank.
MAX_SEED = 2 ** 32 - 1


def default_cache_dir() -> Path:
    """Where datasets live: $XDG_CACHE_HOME/fastft, else ~/.cache/fastft; where that cannot be
    written (a read-only file system), a temporary folder (fastft.safe_write.usable_cache_dir)."""
    from fastft.safe_write import usable_cache_dir
    return usable_cache_dir(preferred_cache_dir())


def preferred_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastft, else ~/.cache/fastft, whether or not it can be written."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastft"


@dataclass
class TrainConfig:
    # --- data ---
    data: str = ""                 # "" = the hotdog set (downloaded once), "synthetic", or a DIR
    image_size: int = 0            # px, side of the square training crop; 0 = the model's own (224 for resnet18)
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
    model: str = "resnet18"        # a torchvision classifier's builder name, or timm:NAME (fastft.models)
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
    seed: int = 0                  # 0..MAX_SEED
    tensorboard: bool = False      # per-epoch scalars (loss, accuracies, examples/sec, lr) to RUN_DIR/tb

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """"; did you mean X?" for the choice closest to a mistyped `value` (difflib's ratio >= 0.6,
    letter case ignored), else ""."""
    lowered = {choice.lower(): choice for choice in choices}
    near = difflib.get_close_matches(value.lower(), list(lowered), n=1)
    return f"; did you mean {lowered[near[0]]}?" if near else ""


def strategy_problem(spec: str, model: str = "resnet18") -> str | None:
    """Why `spec` names no strategy (finetune ... scratch, or partial:K), else None. K is checked
    here for resnet18 (4 stages); for other models once the model is built (fastft.strategy)."""
    name, _, k = spec.partition(":")
    if spec in STRATEGY_NAMES or (name == "partial" and k.isdigit() and (model != "resnet18" or
                                                                         int(k) <= PARTIAL_STAGES)):
        return None
    choices = ", ".join([*STRATEGY_NAMES, f"partial:K (K = 0..{PARTIAL_STAGES} for resnet18)"])
    hint = (f"; K counts the residual stages frozen after the stem, 0..{PARTIAL_STAGES} for resnet18 "
            f"(`fastft models NAME` lists a model's)"
            if name == "partial" else did_you_mean(spec, [*STRATEGY_NAMES, "partial:1"]))
    return f"unknown strategy {spec!r}; choose one of {choices}{hint}"


def device_problem(device: str, flag: str = "--device") -> str | None:
    """Why `device` is not auto|cpu|cuda|cuda:N, else None (whether CUDA exists is runtime's to say)."""
    if DEVICE_FORM.fullmatch(device):
        return None
    hint = "; did you mean cuda?" if device.lower() in ("gpu", "nvidia") else did_you_mean(device, ["auto", "cpu", "cuda"])
    return f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}{hint}"


def batch_split_problem(batch_size: int, world_size: int) -> str | None:
    """Why a global `batch_size` cannot be split evenly over `world_size` processes, naming the
    nearest sizes that can (multiples of world_size), else None."""
    if world_size <= 1 or batch_size % world_size == 0:
        return None
    below = batch_size - batch_size % world_size
    sizes = [size for size in (below, below + world_size) if size >= 1]
    return (f"--batch-size {batch_size} does not divide over {world_size} processes (it is the global batch, "
            f"split evenly); use --batch-size {' or '.join(map(str, sizes))}")


def _numbers_problem(cfg: TrainConfig) -> str | None:
    """A float option typed as nan or inf, which no check below would catch."""
    for flag, value in (("--lr", cfg.lr), ("--head-lr-mult", cfg.head_lr_mult), ("--weight-decay", cfg.weight_decay),
                        ("--momentum", cfg.momentum), ("--cache-gb", cfg.cache_gb),
                        ("--dist-timeout", cfg.dist_timeout_s)):
        if not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
    return None


def seed_problem(seed: int, flag: str = "--seed") -> str | None:
    """A seed outside 0..MAX_SEED (torch would stop at one over 64 bits with "Overflow when
    unpacking long long", after its 10-30 s import), else None."""
    if 0 <= seed <= MAX_SEED:
        return None
    return f"{flag} must be from 0 to {MAX_SEED} (2^32 - 1), got {seed}"


def paths_problem(cfg: TrainConfig) -> str | None:
    """A --data folder or --weights file that does not exist (the CLI asks before torch loads;
    a resumed run's checkpoint may make them moot, which the engine says first)."""
    return _data_problem(cfg.data) or _weights_problem(cfg.weights)


def _data_problem(data: str) -> str | None:
    """`--data` that is neither the hotdog set (""), synthetic nor an existing folder."""
    if not data or data == SYNTHETIC or Path(data).expanduser().exists():
        return None
    return (f"--data {data}: no such folder (expected DIR/train/CLASS/*.jpg and DIR/test/CLASS/*.jpg, "
            f"'{SYNTHETIC}', or no --data for the hotdog set){did_you_mean(data, [SYNTHETIC])}")


def _weights_problem(weights: str) -> str | None:
    if weights in ("", "imagenet", "none") or Path(weights).exists():
        return None
    hint = did_you_mean(weights, ["imagenet", "none"])
    return f"{weights}: no such weights file (--weights takes imagenet, none or a PATH){hint}"


def validate(cfg: TrainConfig) -> None:
    """Reject settings that can only fail later, with one line that says why. Needs no torch, so
    the CLI runs it before the heavy imports (a typo is answered in a fraction of a second)."""
    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.save_every >= 1, f"--save-every must be at least 1 epoch, got {cfg.save_every}"),
        (cfg.image_size == 0 or cfg.image_size >= 32,
         f"--image-size must be at least 32 px (a CNN halves it 5 times), got {cfg.image_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.head_lr_mult > 0, f"--head-lr-mult must be positive, got {cfg.head_lr_mult}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.workers >= -1, f"--workers must be 0 or more, got {cfg.workers}"),
        (min(cfg.synth_train, cfg.synth_test) >= 2, f"--synth-train and --synth-test must be at least 2 "
                                                    f"(a class needs an image), got {cfg.synth_train}/{cfg.synth_test}"),
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
    problems = [_numbers_problem(cfg)] + [message for ok, message in checks if not ok]
    problems += [strategy_problem(cfg.strategy, cfg.model), device_problem(cfg.device), seed_problem(cfg.seed)]
    for message in problems:
        if message:
            raise ConfigError(message)


def oversized_batch_line(batch_size: int, n_train: int, world_size: int = 1) -> str | None:
    """The log's line for a global batch larger than the train split (e.g. 128 on 60 images):
    every epoch is then one step over all of them, each process taking its share. None otherwise."""
    if batch_size <= n_train:
        return None
    share = "" if world_size <= 1 else f", each of the {world_size} processes taking its share"
    return (f"--batch-size {batch_size} is larger than the train split's {n_train} images: each epoch is one "
            f"step (one update) over all {n_train}{share}")
