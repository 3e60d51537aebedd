"""Where a job's time goes: the wall time from the process start to the summary, in phases.

    clock = PhaseClock(process_start())   # the CLI; PhaseClock() starts now (bench rows, tests)
    clock.setup_begins()                  # start-up: process start -> Trainer.setup()
    with clock.timed("eval"): ...         # a named phase, measured around its own work
    job_s, phases_s = clock.split(compile_s)

The phases (seconds, summary.json `phases_s`):
  startup       process start (or the clock's origin) -> Trainer.setup() begins: Python,
                `import torch`, argument parsing;
  data          the data setup (dataset scan, header checks, the loader's construction),
                less the cached loader's decode pass inside it;
  first_decode  the cached loader's decode pass (its own decode_s), plus the first epoch's wait
                for its first train batch: DataLoader worker start-up and first decode (torch),
                pipeline start (DALI), one crop batch (cached);
  compile       the engine's compile_s: the first step's excess over a steady step, when compiled;
  train         the train epochs' wall time (loading + steps), less first_decode's wait and compile;
  eval          Trainer.evaluate() calls, the frozen test-feature fill included;
  checkpoints   Trainer.save_checkpoint() calls;
  other         the rest: model build and weights, optimizer, run-folder files, the summary,
                and the run's end waiting for curves.png's background draw (report.Reporter.close).
Every named phase is measured with time.perf_counter around its own work, on the host only
(no device sync of its own: the engine's epoch already ends in one); `other` is the
remainder, so the phases add up to job_s exactly.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

NAMES = ("startup", "data", "first_decode", "compile", "train", "eval", "checkpoints")
LABELS = {"startup": "start-up", "first_decode": "first decode", "checkpoints": "checkpoints"}


def process_start(fallback: float | None = None) -> float | None:
    """This process's start on the time.perf_counter() scale (s), or `fallback` where Linux's /proc
    cannot say (another OS, a restricted /proc).

    /proc/self/stat field 22 is the start in clock ticks after boot, /proc/uptime the seconds
    since boot now (proc(5)); both count from the same boot, so their difference is the process's
    age to a tick (10 ms), with none of /proc/stat btime's whole-second rounding.
    """
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its closing bracket.
            fields = f.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 overall; fields[0] is field 3
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return fallback
    if age < 0:  # clocks that disagree (an odd container): no trustworthy answer
        return fallback
    return time.perf_counter() - age


class PhaseClock:
    """Seconds per phase of one job (see the module doc); host clock readings only."""

    def __init__(self, origin: float | None = None):
        """`origin`: the job's start on the perf_counter scale (the process start for the CLI);
        None = now, e.g. a bench run inside a longer process, whose start-up is then ~0."""
        self.origin = time.perf_counter() if origin is None else origin
        self.seconds = dict.fromkeys(NAMES, 0.0)

    def add(self, name: str, seconds: float) -> None:
        """Add measured seconds to a named phase. Raises KeyError for a name not in NAMES."""
        if name not in self.seconds:
            raise KeyError(f"no phase {name!r}; phases are {NAMES}")
        self.seconds[name] += seconds

    @contextmanager
    def timed(self, name: str):
        """Add the wall time of the `with` body to phase `name` (even when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def setup_begins(self) -> None:
        """Start-up ends: origin -> now."""
        self.add("startup", time.perf_counter() - self.origin)

    def data_ready(self, setup_s: float, decode_s: float) -> None:
        """The data setup took `setup_s`, of which `decode_s` was the cached loader's decode pass."""
        self.add("data", setup_s - decode_s)
        self.add("first_decode", decode_s)

    def train_epoch(self, wall_s: float, first_wait_s: float, first: bool) -> None:
        """One train epoch's wall time; the first epoch's wait for its first batch is first_decode."""
        waited = first_wait_s if first else 0.0
        self.add("first_decode", waited)
        self.add("train", wall_s - waited)

    def split(self, compile_s: float = 0.0) -> tuple[float, dict]:
        """(job_s, phases_s) now: compile_s moves from train (it happened in the first step) to
        compile, and `other` is what no named phase measured."""
        job_s = time.perf_counter() - self.origin
        phases = dict(self.seconds)
        moved = min(compile_s, phases["train"])
        phases["train"] -= moved
        phases["compile"] += moved
        phases["other"] = job_s - sum(phases.values())
        return job_s, phases


def phases_line(job_s: float, phases: dict) -> str:
    """One line: `job 51.2 s: start-up 8.1, data 0.4, ..., other 1.6`."""
    parts = ", ".join(f"{LABELS.get(name, name)} {seconds:.1f}" for name, seconds in phases.items())
    return f"job {job_s:.1f} s: {parts}"
