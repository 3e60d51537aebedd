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
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and launch.launched:
        return torch.device("cuda", launch.local_rank)  # one GPU per process, as torchrun numbers them
    return device


def pick_amp(requested: str, device: torch.device) -> torch.dtype | None:
    if requested != "auto":
        return AMP_DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def default_workers(device: torch.device, processes_here: int = 1) -> int:
    """Loader processes: on CUDA the CPU cores are free to decode; on a CPU they would
    steal cores from the step (2 cores, 64 px: 61 img/s with 0 workers, 54 with 2)."""
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // processes_here))


def resolve_runtime(cfg: TrainConfig, launch: Launch = Launch()) -> Runtime:
    device = pick_device(cfg.device, launch)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device, launch.local_world_size)
    return Runtime(
        device=device,
        amp_dtype=pick_amp(cfg.amp, device),
        compile=cfg.compile if cfg.compile is not None else device.type == "cuda",
        channels_last=cfg.channels_last,
        workers=workers,
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        distributed=launch.launched,
    )
