"""Train and test batches/s of the cached loader (decode once, then the crop kernel) against
DALI's pipeline, on the same files, batch size and device.

    python bench/cached_loader.py                                    # CPU: 224 px, batch 32
    python bench/cached_loader.py --synth-train 2000 --synth-test 800 --max-side 320 --json out.json

Batches are handed over as training takes them (on the device, channels_last, AMP dtype); no
model runs. Each loader makes --epochs passes over each split; the first is a warm-up (DALI's
pipeline build; nothing for the cached loader, whose decode happens at construction and is
reported on its own line) and the rest are reported as mean and min-max batches/s and images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fastft.config import default_cache_dir
from fastft.data.cached_loader import CachedLoaders, plan_cache
from fastft.data.layout import scan_dataset
from fastft.runtime import Runtime, pick_amp, pick_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help="DIR, or 'synthetic' (default)")
    p.add_argument("--synth-train", type=int, default=256, help="images, for --data synthetic")
    p.add_argument("--synth-test", type=int, default=64, help="images, for --data synthetic")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decode threads, both loaders")
    p.add_argument("--max-side", type=int, default=0, help="cached: --cache-max-side (0 = full size)")
    p.add_argument("--epochs", type=int, default=4, help="passes per loader; the first is warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--no-dali", action="store_true", help="the cached loader alone")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first pass is a warm-up")
    return args


def data_dir(args) -> Path:
    if args.data != "synthetic":
        return Path(args.data).expanduser()
    from fastft.data.synth import cached_synthetic
    return cached_synthetic(default_cache_dir(), n_train=args.synth_train, n_test=args.synth_test)


def passes(make_pass, epochs: int, device: torch.device) -> list[tuple[float, float]]:
    """(batches/s, images/s) of each pass after the first, each batch read once on the device."""
    measured = []
    for e in range(epochs):
        touched, batches, images = torch.zeros((), device=device), 0, 0
        start = time.perf_counter()
        for x, y in make_pass(e):
            touched += x[0, 0, 0, 0].float()  # a view: the batch must exist, no per-batch sync
            batches, images = batches + 1, images + y.shape[0]
        touched.item()
        if e:
            seconds = time.perf_counter() - start
            measured.append((batches / seconds, images / seconds))
    return measured


def row(loader: str, split: str, measured: list[tuple[float, float]]) -> dict:
    per_s = [b for b, _ in measured]
    return {"loader": loader, "split": split, "batches_per_s": statistics.mean(per_s), "min": min(per_s),
            "max": max(per_s), "images_per_s": statistics.mean(i for _, i in measured), "passes": len(measured)}


def loader_rows(name: str, loaders, epochs: int, device) -> list[dict]:
    return [row(name, "train", passes(loaders.train_batches, epochs, device)),
            row(name, "test", passes(lambda e: loaders.test_batches(), epochs, device))]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    rt = Runtime(device=device, amp_dtype=pick_amp(args.amp, device), compile=False, channels_last=True,
                 workers=args.threads)
    root = data_dir(args)
    layout = scan_dataset(root)
    plan = plan_cache(layout, args.image_size, rt, 0.0, args.max_side)
    cached = CachedLoaders(layout, args.image_size, args.batch_size, rt, seed=0, plan=plan,
                           max_side=args.max_side, threads=args.threads)
    rows = loader_rows("cached", cached, args.epochs, device)
    notes = cached.describe()
    if not args.no_dali:
        from fastft.data.dali_loader import DaliLoaders, DaliOptions
        dali = DaliLoaders(layout, args.image_size, args.batch_size, rt, seed=0,
                           options=DaliOptions(threads=args.threads))
        rows += loader_rows("dali", dali, args.epochs, device)
        notes += dali.describe()
    header = [f"data {root}: {len(layout.files['train'])} train / {len(layout.files['test'])} test images, "
              f"image {args.image_size} px, batch {args.batch_size}, {args.threads} threads",
              f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"{os.cpu_count()} cores, amp {rt.amp_name}, channels_last",
              f"{args.epochs - 1} measured passes per split after 1 warm-up pass (mean, min-max)", *notes]
    print("\n".join(header))
    print(f"{'loader':7} {'split':6} {'batches/s':>10} {'min-max':>13} {'images/s':>9}")
    for r in rows:
        print(f"{r['loader']:7} {r['split']:6} {r['batches_per_s']:10.1f} {r['min']:6.1f}-{r['max']:<6.1f} "
              f"{r['images_per_s']:9.1f}")
    by = {(r["loader"], r["split"]): r["batches_per_s"] for r in rows}
    if ("dali", "train") in by:
        print(f"cached / dali, train batches/s: {by['cached', 'train'] / by['dali', 'train']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
