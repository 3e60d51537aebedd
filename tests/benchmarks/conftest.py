"""The benchmarks' same-run ratio and the slowdown that proves the regression gate (bench/compare.py).

Each benchmark times the thing it measures and its reference in the same test, in interleaved
rounds (measured, reference, then reference, measured, ...), so a neighbour's burst on a shared
machine lands on both, and reports the median of the per-round ratios, in CPU seconds
(`speedup_vs_reference_cpu`, what bench/compare.py gates on) and wall seconds
(`speedup_vs_reference`). Absolute means move by 20-60% between two runs on a shared 2-core CPU.

FASTFT_BENCH_SLOWDOWN=0.3 makes every measured call (never the reference) spin for 0.3 x its own
time after it returns: a 30% regression on demand, read here only, never by fastft.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

SLOWDOWN_ENV = "FASTFT_BENCH_SLOWDOWN"
ROUNDS = 31  # interleaved (measured, reference) pairs per ratio; see bench/README.md for its spread
WARMUP = 3   # calls of each before the rounds: allocator, oneDNN primitives, DALI's pipeline


@dataclass
class Pair:
    """One interleaved measurement: seconds per call of each side (medians) and their ratio."""
    measured_s: float
    reference_s: float
    speedup: float   # median over rounds of reference_s / measured_s in that round; > 1: measured faster
    speedup_cpu: float  # the same over the process's CPU seconds (time.process_time)
    rounds: int


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Torch on one thread for each benchmark, restored after.

    On a shared machine a descheduled OpenMP thread stalls every barrier of the step: with two
    threads, one 32 px finetune step took 0.36 to 9.7 s in a row; with one, 0.16 to 0.31 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slowdown() -> float:
    """FASTFT_BENCH_SLOWDOWN as a fraction of the measured call's time (0: unset)."""
    raw = os.environ.get(SLOWDOWN_ENV, "0")
    try:
        fraction = float(raw)
    except ValueError:
        fraction = -1.0
    if not fraction >= 0:  # also rejects nan
        raise pytest.UsageError(f"{SLOWDOWN_ENV}={raw!r}: expected a fraction >= 0, e.g. 0.3")
    return fraction


def slowed(fn, fraction: float):
    """`fn`, then `fraction` x the time it took of busy waiting: the injected regression."""
    if not fraction:
        return fn

    def run(*args):
        start = time.perf_counter()
        out = fn(*args)
        # Busy, not asleep: the delay must show in CPU seconds as well as in wall seconds.
        end = time.perf_counter() + fraction * (time.perf_counter() - start)
        while time.perf_counter() < end:
            pass
        return out
    return run


def seconds(fn, args) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu


def median_ratio(m: list, r: list, clock: int) -> float:
    return statistics.median(b[clock] / a[clock] for a, b in zip(m, r))


def interleave(measured, margs: tuple, references: dict, rounds: int, warmup: int) -> dict[str, Pair]:
    """Time `measured(*margs)` against each `references[name] = (fn, args)` in rotating order,
    `rounds` calls each; {name: Pair of measured against that reference}."""
    calls = [(measured, margs)] + list(references.values())
    for _ in range(warmup):
        for fn, args in calls:
            fn(*args)
    times = [[] for _ in calls]
    for i in range(rounds):
        # Rotate who goes first, so no side always runs just after another's cache misses.
        order = list(range(len(calls)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in order:
            times[k].append(seconds(*calls[k]))
    m = times[0]
    return {name: Pair(statistics.median(t[0] for t in m), statistics.median(t[0] for t in r),
                       median_ratio(m, r, 0), median_ratio(m, r, 1), rounds)
            for name, r in zip(references, times[1:])}


@pytest.fixture
def pair(benchmark, slowdown):
    """`pair(measured, margs, reference=(fn, args), ...)` -> (the measured callable as benchmarked,
    {reference name: Pair}).

    Timed runs take ROUNDS rounds after WARMUP; with --benchmark-disable (CI) one round and no
    warm-up, so the numbers exist and cost one call of each. The returned callable carries the
    slowdown, so pytest-benchmark's own timing of it shows the injected regression too.
    """
    def run(measured, margs: tuple = (), **references):
        measured = slowed(measured, slowdown)
        rounds, warmup = (1, 0) if benchmark.disabled else (ROUNDS, WARMUP)
        return measured, interleave(measured, margs, references, rounds, warmup)
    return run
