"""Multi-process training: DistributedDataParallel under torchrun, the standard launcher.

    torchrun --standalone --nproc_per_node=4 -m fastft train --data synthetic
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \
             --rdzv-endpoint=HOST:29500 -m fastft train ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `fastft train` has none
of them and is the single-process case of the same code (no process group, no
DDP wrapper). Under torchrun the model is wrapped even with one process, so the
wrapper's own cost can be measured.

Failure: every collective has a timeout (`--dist-timeout`), so no rank waits
forever; torchrun stops the other ranks as soon as one exits non-zero.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastft.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1   # processes on this machine, sharing its CPU cores
    launched: bool = False      # started by torchrun (a process group exists)


def launch_from_env(env: dict | None = None) -> Launch:
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Launch()
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise ConfigError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({exc})") from exc
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Launch(rank, local, world, local_world, launched=True)


def start(launch: Launch, device_type: str, timeout_s: float) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if not launch.launched or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def local_main_first(launch: Launch):
    """Let one process per machine fill shared caches (dataset, weights) before the others read."""
    first = launch.local_rank == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """One all-reduce for a small vector of per-rank totals (an epoch's metrics)."""
    if active():
        dist.all_reduce(values)
    return values


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank `src`'s buffers of `module` (BN running statistics), in place.

    What DDP does in its first forward after a training step (broadcast_buffers=True,
    authoritative rank 0; torch/nn/parallel/distributed.py, `_sync_buffers`), made
    explicit so that every rank makes it, including one with nothing to forward.
    One broadcast per buffer dtype (float statistics, int64 batch counts); a
    collective: every rank must call it, with the same module structure.
    """
    if not active():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        buffers = by_dtype[dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=src)
        with torch.no_grad():
            for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(value.reshape(buffer.shape))


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every process: a choice each process made from its own
    machine (free memory, say) that all must make alike, or the job would split."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(obj) -> list:
    """Every rank's value of a picklable object, in rank order (once per epoch, not per step)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def replica_fingerprint(params) -> list[float]:
    """Two numbers that differ between replicas whose parameters differ.

    A fixed pseudo-random projection plus a plain sum: cheap next to an epoch,
    and bit-identical on ranks whose parameters are bit-identical.
    """
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in params])
    weights = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [float(flat @ weights), float(flat.sum())]
