"""How many intra-op threads torch's CPU step gets: the cores this process really has, less what
else runs on them.

torch sizes its pool from the host's cores. On a 2-core Xeon with one other busy process that
costs 2.7x: a bf16 channels_last ResNet-18 step at 64 px ran 48.5 img/s with 2 threads and
129.3 with 1 (issue 18), because every OpenMP region waits for the thread the neighbour
descheduled. So the count is decided from four inputs, each read by its own function here:

  cores     the CPUs this process may run on (os.sched_getaffinity);
  quota     a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us / cpu.cfs_period_us` limit, in cores;
  side      threads fastft runs beside the step (DataLoader workers, DALI CPU threads);
  others    cores other processes kept busy, from /proc/stat over a window, less this
            process's own CPU time (see `others_busy`).

    threads = max(1, min(cores - round(others), ceil(quota)) // processes_here - side)

`--threads N` and OMP_NUM_THREADS (the variable users already set for this) override it.
The rule and the readings it rests on are measured in docs/threads.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIN_WINDOW_S = 0.25  # s, shortest /proc/stat window read; shorter ones are a few ticks of 10 ms


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: all processes on `cpus`, and this process alone."""
    at: float      # s, time.monotonic()
    busy: float    # s, non-idle time summed over `cpus` since boot (/proc/stat); 0 if unreadable
    own: float     # s, this process's user + system time, all its threads and reaped children (os.times)
    readable: bool = True

    @classmethod
    def take(cls, cpus: frozenset[int] | None = None, stat: Path = Path("/proc/stat")) -> "CpuSample":
        """Read now; `cpus` defaults to this process's affinity set."""
        times = os.times()
        cpus = usable_cpus() if cpus is None else cpus
        try:
            busy, readable = _busy_seconds(stat.read_text(), cpus), True
        except (OSError, ValueError, IndexError):
            busy, readable = 0.0, False
        # Reaped children count as this process's own: data.decode_ahead's child decodes for it.
        own = times.user + times.system + times.children_user + times.children_system
        return cls(time.monotonic(), busy, own, readable)


def _busy_seconds(text: str, cpus: frozenset[int]) -> float:
    """Non-idle seconds of the `cpuN` lines of /proc/stat for N in `cpus` (proc(5): user nice
    system idle iowait irq softirq steal ..., in USER_HZ ticks; guest time is inside user)."""
    ticks = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        fields = [int(v) for v in rest.split()[:8]]
        ticks += sum(fields) - fields[3] - fields[4]  # less idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def others_busy(since: CpuSample, now: CpuSample) -> float | None:
    """Cores other processes kept busy between two samples: (all busy - own) / wall, >= 0.

    The window is the caller's: the CLI takes `since` at its start, so the import of torch and
    the data setup are the window and the reading costs nothing. Own threads are subtracted, so
    a window in which fastft itself works reads only the others. None where /proc/stat is absent.
    """
    wall = now.at - since.at
    if not (since.readable and now.readable) or wall <= 0:
        return None
    return max(0.0, ((now.busy - since.busy) - (now.own - since.own)) / wall)


def measure_others(since: CpuSample | None = None) -> tuple[float | None, float]:
    """(cores others kept busy, window s) from `since` to now, waiting out MIN_WINDOW_S if needed."""
    since = since or CpuSample.take()
    wait = MIN_WINDOW_S - (time.monotonic() - since.at)
    if wait > 0:
        time.sleep(wait)
    now = CpuSample.take()
    return others_busy(since, now), now.at - since.at


def usable_cpus() -> frozenset[int]:
    """The CPU numbers this process may run on (a container's or taskset's set)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """This process's CPU limit in cores (e.g. 1.5), the smallest over its cgroup and its parents;
    None where there is none. cgroup v2: `cpu.max` is "QUOTA PERIOD" or "max PERIOD"; v1:
    `cpu.cfs_quota_us` (-1 = none) over `cpu.cfs_period_us` (kernel docs, cgroup-v2.rst and
    sched-bwc.rst). Unreadable files count as no limit."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's single hierarchy
            limits += [_v2_limit(d) for d in _dirs_up(root, path)]
        elif "cpu" in controllers.split(","):
            limits += [_v1_limit(d) for d in _dirs_up(root / controllers, path)]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _dirs_up(base: Path, path: str) -> list[Path]:
    """base/path and each parent up to base itself (a container sees its own cgroup as "/")."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str    # why, in words, for the log line and config.json

    def line(self) -> str:
        return f"threads {self.threads}: {self.reason}"


@dataclass(frozen=True)
class Capacity:
    """The inputs of the decision, each measured by its own function above (or faked in tests)."""
    cores: int                     # CPUs in the affinity set
    quota: float | None = None     # cores, the cgroup limit; None = none
    others: float | None = None    # cores busy with other processes; None = unknown (no /proc)
    window_s: float = 0.0          # s, the window `others` was read over
    processes_here: int = 1        # training processes on this machine (torchrun's LOCAL_WORLD_SIZE)
    side: int = 0                  # fastft's threads/processes busy beside the step


def override(typed: int = 0, env: Mapping[str, str] | None = None) -> ThreadChoice | None:
    """The count the user gave: `typed` > 0 (--threads), else OMP_NUM_THREADS in `env` (default
    os.environ); None where neither is given (or the variable is not a positive integer)."""
    env = os.environ if env is None else env
    if typed > 0:
        return ThreadChoice(typed, "--threads")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp} in the environment")
    return None


def choose_threads(capacity: Capacity, typed: int = 0, env: Mapping[str, str] | None = None) -> ThreadChoice:
    """The intra-op thread count for the step, and why: `override(typed, env)` if given, else the
    rule in the module doc.

    A neighbour counts as a taken core when it keeps more than half a core busy (round): with
    2 threads and a fully busy neighbour one thread waits at every region (2.8-4.7x slower than
    1 thread, docs/threads.md), on a quiet machine 2 threads are about 1.7x faster than 1
    (issue 18); half a core busy is near where the two cross. A quota is rounded up: throttling
    stops all of the group's threads together, so no thread waits for a descheduled partner,
    and 2 threads in a 1.5-core quota do 1.5 cores' work.
    """
    given = override(typed, env)
    if given:
        return given
    c = capacity
    free = c.cores - (round(c.others) if c.others is not None else 0)
    if c.quota is not None:
        free = min(free, math.ceil(c.quota))
    threads = max(1, free // max(1, c.processes_here) - c.side)
    return ThreadChoice(threads, _reason(c))


def decide(since: CpuSample | None = None, processes_here: int = 1, side: int = 0, typed: int = 0,
           env: Mapping[str, str] | None = None) -> ThreadChoice:
    """choose_threads on this machine, its capacity measured only where nothing overrides it
    (so a run with --threads or OMP_NUM_THREADS never waits for a load reading)."""
    return override(typed, env) or choose_threads(measured_capacity(since, processes_here, side), env={})


def _reason(c: Capacity) -> str:
    parts = [f"{c.cores} core(s) in the affinity set"]
    parts.append("no cgroup CPU quota" if c.quota is None else f"cgroup CPU quota {c.quota:g} core(s)")
    parts.append("other processes' load unknown (no /proc/stat)" if c.others is None else
                 f"other processes busy on {c.others:.1f} core(s) over {c.window_s:.1f} s")
    if c.processes_here > 1:
        parts.append(f"{c.processes_here} training processes on this machine")
    if c.side:
        parts.append(f"{c.side} loader worker(s)/thread(s) beside the step")
    return ", ".join(parts) + "; --threads N overrides"


def measured_capacity(since: CpuSample | None = None, processes_here: int = 1, side: int = 0) -> Capacity:
    """Capacity with every input read from this machine now (the window from `since`)."""
    others, window = measure_others(since)
    return Capacity(cores=len(usable_cpus()), quota=cgroup_quota(), others=others, window_s=window,
                    processes_here=processes_here, side=side)


def recheck(current: ThreadChoice, since: CpuSample, now: CpuSample, processes_here: int = 1,
            side: int = 0) -> ThreadChoice | None:
    """The rule again over a window of training (an epoch), for a neighbour that started or
    stopped after start-up: a new ThreadChoice where the count changes, else None (also for a
    window under MIN_WINDOW_S or without /proc/stat). The step's own threads are subtracted as
    at start-up: with 2 threads beside one busy neighbour the scheduler gives each of the 3 about
    2/3 of a core, which reads as 0.7 core of others, so the neighbour still counts (round)."""
    others = others_busy(since, now)
    if others is None or now.at - since.at < MIN_WINDOW_S:
        return None
    capacity = Capacity(cores=len(usable_cpus()), quota=cgroup_quota(), others=others,
                        window_s=now.at - since.at, processes_here=processes_here, side=side)
    choice = choose_threads(capacity, env={})
    return choice if choice.threads != current.threads else None

