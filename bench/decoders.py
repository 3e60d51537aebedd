"""JPEG decode rate on the CPU: torchcodec's decode_jpeg, torchvision's (the cached loader's
batched decoder and its fallback, fastft/data/decoders.py) and PIL (load_rgb's decoder), on the
same files held in memory (no disk), one thread, interleaved rounds (each round times every
decoder once, in a rotated order, so a change of machine load hits them alike).

    python bench/decoders.py DIR [--rounds 5] [--limit 200]    # DIR: e.g. `fastft data synth DIR`

Prints one line per decoder: images/s, median (min-max) over rounds, and the load average.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import torch
from PIL import Image


def _decoders() -> dict:
    out = {"PIL": lambda data: Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB").load()}
    try:
        from torchcodec.decoders import decode_jpeg as tc_decode
        out["torchcodec"] = lambda data: tc_decode(data, mode="RGB")
    except Exception as exc:  # not installed, or built for another torch
        print(f"torchcodec: not measured ({type(exc).__name__}: {exc})")
    from torchvision.io import ImageReadMode, decode_jpeg
    out["torchvision"] = lambda data: decode_jpeg(data, mode=ImageReadMode.RGB)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=200, help="files, the first in sorted order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted(args.dir.rglob("*.jpg"))[: args.limit]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    decoders = _decoders()
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for name, decode in decoders.items():  # warm-up: libraries loaded, first-call costs paid
        decode(encoded[0])
    names = list(decoders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for data in encoded:
                decoders[name](data)
            rates[name].append(len(encoded) / (time.perf_counter() - start))
    load = os.getloadavg()
    print(f"{len(files)} JPEGs from {args.dir}, {args.rounds} rounds, 1 thread, loadavg {load[0]:.2f} {load[1]:.2f}")
    for name, values in rates.items():
        print(f"{name:12s} {statistics.median(values):7.1f} img/s ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
