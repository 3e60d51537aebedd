"""torch's intra-op thread count for the step over a run: chosen at setup from the cores this
process really has, and chosen again after each epoch. fastft.threads reads the machine and
states the rule (torch-free, so the CLI can take its first reading before torch loads); this
module applies its answers to torch. Measurements: docs/threads.md.
"""

from __future__ import annotations

import torch

from fastft import threads
from fastft.threads import CpuSample, ThreadChoice


class StepThreads:
    """The step's thread count, `choice`: set on torch by start(), and after an epoch by recheck()."""

    def __init__(self, typed: int, rt, loader: str, loader_threads: int = 0, processes_here: int = 1):
        """`typed`: --threads (0 = auto). `rt`: the run's Runtime (device, workers, compile).
        `loader`: the backend's name; `loader_threads`: its CPU threads, which count beside the
        step for DALI only (the cached loader has decoded by then; the torch loader's beside-step
        work is its `rt.workers` processes). `processes_here`: torchrun's LOCAL_WORLD_SIZE."""
        self.typed, self.rt, self.loader, self.processes_here = typed, rt, loader, processes_here
        self.side = loader_threads if loader == "dali" else rt.workers
        self.choice = ThreadChoice(torch.get_num_threads(), "not chosen yet")

    def start(self, since: CpuSample | None) -> ThreadChoice:
        """Decide over the window from `since` (threads.decide) and set the count; on CUDA torch's
        default stays, unless typed (the step runs on the GPU). Returns the choice."""
        if self.rt.device.type == "cuda" and self.typed <= 0:
            self.choice = ThreadChoice(torch.get_num_threads(), "torch's default: the step runs on the GPU")
        else:
            self.choice = threads.decide(since, self.processes_here, self.side, self.typed)
            torch.set_num_threads(self.choice.threads)
        return self.choice

    def recheck(self, since: CpuSample) -> str | None:
        """The rule again over the epoch that began at `since` (threads.recheck): where the count
        changes, set it for the next epoch and return the log line; else None. Not where the count
        was given, on CUDA, when compiled (Inductor's C++ kernels bake the count in), or beside
        DataLoader worker processes (their CPU time would read as a neighbour's)."""
        if (self.rt.device.type == "cuda" or self.rt.compile or threads.override(self.typed) is not None
                or (self.loader == "torch" and self.rt.workers > 0)):
            return None
        side = self.side if self.loader == "dali" else 0
        new = threads.recheck(self.choice, since, CpuSample.take(), self.processes_here, side)
        if new is None:
            return None
        old, self.choice = self.choice, new
        torch.set_num_threads(new.threads)
        return (f"threads {old.threads} -> {new.threads} from the next epoch: "
                f"{new.reason.split('; ')[0]} during this one")
