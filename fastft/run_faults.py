"""What a training run says when it stops early: out of memory, Ctrl-C, a file it cannot write.

`guard(trainer)` wraps a run's setup and fit (engine.train) and turns each of these into one
line that says what is true of the run folder and what to type next:
- out of memory (torch's `DefaultCPUAllocator: can't allocate memory` RuntimeError, or CUDA's
  torch.OutOfMemoryError): the batch and image size that failed and an estimate of what fits;
- Ctrl-C: whether the run folder holds a checkpoint, of which epoch, and the command that
  resumes it, or that there is nothing to resume yet;
- a WriteError (a full disk, a read-only folder; fastft.safe_write) during the run: the same
  note on the checkpoint, which such a failure never touches.
The engine's own `finally` has already let a checkpoint write in flight land when these run.
"""

from __future__ import annotations

import math
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.checkpoint import checkpoint_path
from fastft.errors import Interrupted, ResourceError, WriteError
from fastft.safe_write import human_bytes, shown

# What torch's allocators say when a request fails (c10/core/impl/alloc_cpu.cpp, and
# c10/cuda/CUDACachingAllocator.cpp, whose torch.OutOfMemoryError is a RuntimeError too).
OOM_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "out of memory")
TRIED = re.compile(r"tried to allocate ([\d.]+) ?(bytes|KiB|MiB|GiB|B)?", re.IGNORECASE)
UNITS = {"bytes": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
HEADROOM = 0.9  # of the estimate: the allocator's fragmentation and the loader's own buffers
# A ResNet-18 training step (fp32, channels_last, CPU, torch 2.14) raised the process's peak RSS
# from 974 MB at batch 1 to 1304 MB at batch 4 of 512 px: 110 MB per image, 440 bytes per input
# pixel. AMP and frozen stages keep less, so this bound errs towards a smaller batch.
ACTIVATION_BYTES_PER_PX = 440
SIZE_STEP = 32  # px: ResNet-18's total stride, so every stage keeps whole pixels


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in OOM_TEXTS))


def tried_bytes(message: str) -> int | None:
    """The failed request's size as the allocator states it ("you tried to allocate 3221225472
    bytes", "Tried to allocate 2.00 GiB"), or None."""
    found = TRIED.search(message)
    if not found:
        return None
    return int(float(found.group(1)) * UNITS[(found.group(2) or "bytes").lower()])


@dataclass(frozen=True)
class Memory:
    used: int  # bytes this process holds (CUDA: torch's allocated memory; CPU: resident set)
    free: int  # bytes it could still get (CUDA: the device's free memory; CPU: RAM, cgroup-capped)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_kb(field: str, path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_now(device: torch.device) -> Memory | None:
    """What this process holds and could still get, for the estimate; None where unknown.
    CPU: a cgroup v2 limit (memory.max - memory.current, a container's limit) and `ulimit -v`
    cap MemAvailable."""
    if device.type == "cuda":  # the thin CUDA branch
        free, _ = torch.cuda.mem_get_info(device)
        return Memory(torch.cuda.memory_allocated(device), free)
    rss, available = _meminfo_kb("VmRSS", "/proc/self/status"), _meminfo_kb("MemAvailable")
    if rss is None or available is None:
        return None
    free = available * 1024
    limit, current = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and current is not None:
        free = min(free, max(0, limit - current))
    return Memory(rss * 1024, min(free, _address_space_left()))


def _address_space_left() -> float:
    """Bytes `ulimit -v` (RLIMIT_AS) still allows this process to map; inf where unlimited."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return math.inf
    size = _meminfo_kb("VmSize", "/proc/self/status")
    if limit == resource.RLIM_INFINITY or size is None:
        return math.inf
    return max(0, limit - size * 1024)


def fitting_share(tried: int | None, memory: Memory | None, step_pixels: int, base: int) -> float:
    """The share of the failed step's batch x pixels that should fit; always below 1.

    Two bounds, the smaller taken, each with HEADROOM: the step needed at least what it held plus
    the failed request, so at most (held + free) / (held + request) of it fits; and a training
    step of ResNet-18 keeps ACTIVATION_BYTES_PER_PX per input pixel, so what the process can hold
    beyond `base` (its memory before the run: libraries, no activations) fits that many pixels.
    `step_pixels`: images per process x side^2. Half where the memory cannot be read."""
    if memory is None:
        return 0.5
    room = memory.used + memory.free
    by_pixels = HEADROOM * max(0, room - base) / (ACTIVATION_BYTES_PER_PX * max(1, step_pixels))
    if tried is None or tried <= memory.free:  # failed although it looked free: fragmentation, limits
        return min(0.5, by_pixels)
    return min(0.95, by_pixels, HEADROOM * room / (memory.used + tried))


def oom_line(exc: BaseException, batch: int, image_size: int, world_size: int, device: torch.device,
             memory: Memory | None, base: int = 0, size_is_an_option: bool = True) -> str:
    """One line: where memory ran out, at which batch and image size, and what should fit
    (`size_is_an_option` False: the image size is the run's, as in eval: the batch only).

    Activation memory grows with images x pixels, so a share s of it fits at batch x s, or at the
    same batch with a side of size x sqrt(s) (rounded down to SIZE_STEP); s from fitting_share."""
    tried = tried_bytes(str(exc))
    per_process = batch // max(1, world_size)
    share = fitting_share(tried, memory, per_process * image_size ** 2, base)
    fit_batch = max(1, math.floor(per_process * share)) * max(1, world_size)
    fit_size = max(SIZE_STEP, math.floor(image_size * math.sqrt(share) / SIZE_STEP) * SIZE_STEP)
    shape = f"batch {batch}" + (f" ({per_process} per process)" if world_size > 1 else "")
    asked = f" (it asked for {human_bytes(tried)} more)" if tried else ""
    options = [f"--image-size {fit_size} at batch {batch}"] if fit_size < image_size and size_is_an_option else []
    if fit_batch < batch:
        options.insert(0, f"--batch-size {fit_batch}")
    advice = f"try {' or '.join(options)}" if options else "no smaller setting is left; use a larger machine"
    return (f"out of memory on {device} at {shape} of {image_size} px images{asked}; memory grows with "
            f"batch x image side^2: {advice}")


@contextmanager
def out_of_memory_is_one_line(batch: int, image_size: int, device: torch.device):
    """For eval's forward passes: an out-of-memory error becomes a ResourceError naming the batch,
    the run's image size and the --batch-size that should fit."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise ResourceError(oom_line(exc, batch, image_size, 1, device, memory_now(device),
                                     size_is_an_option=False)) from exc


def resume_command(run_dir: Path, world_size: int) -> str:
    launcher = "torchrun ... -m fastft" if world_size > 1 else "fastft"
    return f"{launcher} train --out {shlex.quote(str(run_dir))} --resume"


def saved_note(trainer) -> str:
    """What the run folder holds to resume from, and the command, as one clause."""
    run_dir = getattr(trainer, "run_dir", None)
    if run_dir is None:
        return "nothing was saved"
    epoch = trainer.checkpoints.saved_epoch or trainer.start_epoch or None
    rt = getattr(trainer, "rt", None)
    world = rt.world_size if rt is not None else 1
    if not checkpoint_path(run_dir).is_file():
        first = min(trainer.cfg.save_every, trainer.cfg.epochs)
        return (f"no checkpoint was saved yet (the first is written after epoch {first}), so "
                f"{shown(run_dir)} holds nothing to resume; run the same command to start again")
    which = f"the checkpoint of epoch {epoch}" if epoch else "its last checkpoint"
    return f"{shown(run_dir)} holds {which}; resume with: {resume_command(run_dir, world)}"


@contextmanager
def guard(trainer):
    """Around Trainer.setup().fit(): OOM -> ResourceError, Ctrl-C -> Interrupted, WriteError ->
    the same with the checkpoint note; each one line, raised from the original."""
    before = memory_now(torch.device("cpu"))  # before any data or model: the OOM estimate's base
    try:
        yield
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(f"interrupted; {saved_note(trainer)}") from None
    except WriteError as exc:
        if getattr(trainer, "run_dir", None) is None:  # a preflight refusal: nothing had started
            raise
        raise exc.with_note(saved_note(trainer)) from exc
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        cfg, rt = trainer.cfg, getattr(trainer, "rt", None)
        device = rt.device if rt is not None else torch.device("cpu")
        base = before.used if before is not None and device.type == "cpu" else 0
        line = oom_line(exc, cfg.batch_size, cfg.image_size, rt.world_size if rt else 1, device,
                        memory_now(device), base)
        raise ResourceError(line) from exc
