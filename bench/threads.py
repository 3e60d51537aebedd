"""Bare ResNet-18 train step by torch thread count, beside what fastft.threads reads of the load.

    python bench/threads.py                         # 64 and 224 px, bf16 channels_last and fp32 NCHW
    yes > /dev/null & python bench/threads.py; kill %1   # with one busy neighbour
    python bench/threads.py --sizes 64 --rounds 3 --json threads.json

Each round times every (size, precision, threads) cell, thread counts interleaved within a
cell, and records over the round: /proc/loadavg, and the cores other processes kept busy as
fastft reads them (/proc/stat less this process's own CPU time, fastft.threads.others_busy),
and the thread count fastft would choose from that reading. The table gives img/s per cell
(median of `--steps` steps after one warm-up) and which thread count won, so the reading and
the choice can be checked against the measured best on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

from fastft.threads import Capacity, CpuSample, choose_threads, cgroup_quota, others_busy, usable_cpus

PRECISIONS = {"bf16-cl": (torch.bfloat16, torch.channels_last), "fp32-nchw": (None, torch.contiguous_format)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224", help="px, comma-separated")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: " + ", ".join(PRECISIONS))
    p.add_argument("--threads", default="1,2", help="counts to compare, comma-separated")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell, after one warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def make_step(size: int, batch: int, precision: str):
    dtype, layout = PRECISIONS[precision]
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=layout)
    x = torch.randn(batch, 3, size, size).to(memory_format=layout)
    y = torch.randint(0, 2, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, weight_decay=1e-3)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def img_per_s(step, threads: int, batch: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step()  # warm-up: oneDNN primitives for this thread count
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def one_round(args, steps: dict, counts: list[int], index: int) -> dict:
    since, load_before = CpuSample.take(), Path("/proc/loadavg").read_text().split()[:3]
    cells, cell_others = {}, {}
    for key, step in steps.items():
        order = counts if index % 2 == 0 else counts[::-1]  # who goes first alternates
        cell_since = CpuSample.take()
        cells[key] = {str(n): img_per_s(step, n, args.batch_size, args.steps) for n in order}
        cell_others[key] = others_busy(cell_since, CpuSample.take())
    now = CpuSample.take()
    others = others_busy(since, now)
    choice = choose_threads(Capacity(len(usable_cpus()), cgroup_quota(), others, now.at - since.at), env={})
    return {"loadavg": load_before, "others_busy": others, "window_s": now.at - since.at,
            "fastft_threads": choice.threads, "cells": cells, "cell_others_busy": cell_others}


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    steps = {f"{size}px {p}": make_step(int(size), args.batch_size, p)
             for size in args.sizes.split(",") for p in args.precisions.split(",")}
    rounds = []
    for index in range(args.rounds):
        rounds.append(one_round(args, steps, counts, index))
        r = rounds[-1]
        print(f"round {index + 1}: loadavg {' '.join(r['loadavg'])}, others busy {r['others_busy']:.2f} cores "
              f"over {r['window_s']:.0f} s -> fastft would pick {r['fastft_threads']} thread(s)", flush=True)
        for key, cell in r["cells"].items():
            best = max(cell, key=cell.get)
            rates = ", ".join(f"{n} thr {v:.1f}" for n, v in cell.items())
            print(f"  {key}: {rates} img/s; best {best}, {cell[best] / min(cell.values()):.2f}x "
                  f"(others busy {r['cell_others_busy'][key]:.2f} cores meanwhile)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": _cpu_name(), "rounds": rounds}, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")


if __name__ == "__main__":
    raise SystemExit(main())
