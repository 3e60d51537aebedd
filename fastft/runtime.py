"""Turns the config's `auto` choices into what this machine and process will do.

Everything that depends on the hardware or on the launcher (device, AMP dtype,
compile, process rank) is decided here once, so the rest of the code reads
plain facts instead of probing the machine again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastft.config import TrainConfig
from fastft.distributed import Launch
from fastft.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # None = fp32
    compile: bool
    channels_last: bool
    workers: int                    # DataLoader worker processes
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False       # launched by torchrun: a process group and a DDP wrapper

    @property
    def is_main(self) -> bool:
        """Only the main process prints, writes run files and saves checkpoints."""
        return self.rank == 0

    @property
    def amp_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp_dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast on a CPU without native bf16 math is many times slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_device(requested: str, launch: Launch = Launch()) -> torch.device:
    """The process's device, always with an index on CUDA ("cuda" becomes the current GPU).

    Raises ConfigError for CUDA where none is available, or an index past the visible GPUs.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA device is available here; use --device cpu")
    if device.type != "cuda":
        return device
    if launch.launched:
        return torch.device("cuda", launch.local_rank)  # one GPU per process, as torchrun numbers them
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    visible = torch.cuda.device_count()
    if device.index >= visible:
        raise ConfigError(f"--device {requested}: only {visible} CUDA device(s) are visible here "
                          f"(cuda:0 to cuda:{visible - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
    return device


def make_current(device: torch.device) -> None:
    """Make the run's GPU the current one, so that work naming no device (new events and
    streams, library kernels) lands on it rather than on GPU 0. torchrun's processes get
    the same call from distributed.start; a plain `--device cuda:1` gets it here."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def pick_amp(requested: str, device: torch.device) -> torch.dtype | None:
    if requested != "auto":
        return AMP_DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


MAX_WORKERS = 16  # per process; a guess that bounds worker memory, not a measured optimum


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(device: torch.device, processes_here: int = 1, cores: int | None = None) -> int:
    """DataLoader worker processes per training process when --workers is not typed.

    On CUDA: the cores of this machine split over its training processes, less one for the
    process itself (its Python loop and pin-memory thread), at least 1 and at most
    MAX_WORKERS: 16 cores, 1 process -> 15; 8 processes -> 1. On a CPU device 0, since
    workers would steal cores from the step (2 cores, 64 px: 61 img/s with 0 workers, 54
    with 2). `cores` defaults to usable_cores().
    """
    if device.type != "cuda":
        return 0
    cores = usable_cores() if cores is None else cores
    return max(1, min(MAX_WORKERS, cores // max(1, processes_here) - 1))


def cudnn_benchmark(device: torch.device, train_batch_sizes: set[int]) -> bool:
    """Whether to let cuDNN time its conv algorithms per input shape and keep the fastest.

    That pays only when shapes repeat, so it is on for a CUDA device whose training steps
    all have one shape (`train_batch_sizes`, from the loader, has one entry): DALI drops the
    ragged last train batch always, the torch and cached loaders when compiling, and a
    train set smaller than one batch has one step.
    """
    return device.type == "cuda" and len(train_batch_sizes) == 1


def resolve_runtime(cfg: TrainConfig, launch: Launch = Launch()) -> Runtime:
    """The config's choices made concrete for this process; a CUDA device also becomes current."""
    device = pick_device(cfg.device, launch)
    make_current(device)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device, launch.local_world_size)
    return Runtime(
        device=device,
        amp_dtype=pick_amp(cfg.amp, device),
        # Auto (None) needs the data's size: the engine settles it (compile_cache.settle_compile)
        # before building loaders; callers without data keep this fallback.
        compile=cfg.compile if cfg.compile is not None else device.type == "cuda",
        channels_last=cfg.channels_last,
        workers=workers,
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        distributed=launch.launched,
    )


def check_distributed_settings(cfg: TrainConfig, rt: Runtime, group_device: str) -> None:
    """Refuse, in one line, a resumed run whose device differs from the process group's, and
    --sync-bn off CUDA. Raises ConfigError."""
    if rt.distributed and rt.device.type != group_device:
        raise ConfigError(f"the resumed run uses --device {cfg.device}, but the processes joined a "
                          f"{group_device} group; type --device {rt.device.type} or "
                          f"--device {group_device} with --resume")
    if cfg.sync_bn and rt.distributed and rt.device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                          "drop --sync-bn on CPU: BN statistics are then per process")
