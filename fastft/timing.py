"""Honest clocks: end-to-end epochs and compute-only steps, without a sync per step.

On CUDA a step is timed with events recorded on the stream and read once at the
end of the epoch; on CPU the work is synchronous, so a wall clock is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class StepClock:
    """Marks before and after each step: CUDA events on the run device's current stream, or
    wall-clock readings on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def start(self) -> None:
        self._marks.append(self._mark())

    def stop(self) -> None:
        self._marks.append(self._mark())

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        # The stream named explicitly: a bare record() would use the *current* device's stream,
        # and time an idle GPU 0 if the run's device were not current.
        event.record(torch.cuda.current_stream(self.device))
        return event

    def durations_s(self) -> list[float]:
        """Seconds per step; waits for the device once."""
        starts, stops = self._marks[0::2], self._marks[1::2]
        if not self.cuda:
            return [b - a for a, b in zip(starts, stops)]
        if stops:
            stops[-1].synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in zip(starts, stops)]


def sync(device: torch.device) -> None:
    """The one host-device sync allowed per epoch: before reading a clock or a metric.
    Waits for `device` itself, whichever GPU is current."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochTiming:
    examples: int            # training examples this process stepped on
    wall_s: float            # first batch request to last step done: loading + steps
    step_s: list[float]      # each step alone, as d2l times it
    first_batch: int         # examples in the first step
    first_step_wall_s: float # epoch start to end of the first step (worker start, compile)


def steady_rates(epochs: list[EpochTiming], compiled: bool) -> dict:
    """Examples/sec without warm-up: epochs after the first, or one epoch less its first step."""
    if len(epochs) > 1:
        window, label = epochs[1:], f"steady epochs: last {len(epochs) - 1} of {len(epochs)}"
        examples = sum(e.examples for e in window)
        wall = sum(e.wall_s for e in window)
        steps = [s for e in window for s in e.step_s]
    else:
        only = epochs[0]
        if len(only.step_s) > 1:
            label = "one epoch, first step excluded"
            examples = only.examples - only.first_batch
            wall = only.wall_s - only.first_step_wall_s
            steps = only.step_s[1:]
        else:
            label = "one step, warm-up included"
            examples, wall, steps = only.examples, only.wall_s, only.step_s
    steady_step = sum(steps) / len(steps)
    first_step = epochs[0].step_s[0]
    return {
        "examples_per_sec": examples / wall,
        "examples_per_sec_compute": examples / sum(steps),
        "compile_s": max(0.0, first_step - steady_step) if compiled else 0.0,
        "timed": label,
    }
