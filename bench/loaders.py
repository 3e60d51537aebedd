"""Images/s of the DALI train and test pipelines against the torch reference loader.

    python bench/loaders.py --data synthetic --image-size 224 --batch-size 32
    python bench/loaders.py --data DIR --threads 8 --prefetch 2,3,4 --epochs 3 --json out.json

Both backends read the same files with the same batch size and hand over the
batch as training gets it: on the device, channels_last, in the AMP dtype (the
torch loader's batches are moved there as the engine moves them). No model
runs. Each configuration makes --epochs passes over a split; the first pass
(pipeline build, worker start-up, decoder cache fill) is a warm-up and is not
counted, the rest are reported as mean and min-max images/s.

Runs from the repository root without installing fastft. All DALI loaders of
one run share one decoder-cache plan: DALI keeps one cache per device and
process and refuses a second pipeline asking for other cache arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# `python bench/loaders.py` puts bench/ on sys.path, not the repository root: add it, so
# fastft imports without being installed or PYTHONPATH being set.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fastft.config import default_cache_dir  # noqa: E402
from fastft.data.layout import scan_dataset  # noqa: E402
from fastft.data.torch_loader import TorchLoaders  # noqa: E402
from fastft.runtime import Runtime, pick_amp, pick_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help="DIR, or 'synthetic' (default)")
    p.add_argument("--synth-train", type=int, default=1024, help="images, for --data synthetic")
    p.add_argument("--synth-test", type=int, default=512, help="images, for --data synthetic")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="DALI threads and torch DataLoader workers (default: the cores, divided by "
                        "LOCAL_WORLD_SIZE where set)")
    p.add_argument("--prefetch", default="2", help="DALI prefetch depths to sweep, e.g. 2,3,4")
    p.add_argument("--hw-decoder-load", default="0.65", help="GPU only: values to sweep, e.g. 0.5,0.65,0.8")
    p.add_argument("--decode-cache", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--epochs", type=int, default=2, help="passes per configuration; the first is warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first pass is a warm-up")
    return args


def default_threads() -> int:
    """Usable cores split over the processes on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def data_dir(args) -> Path:
    if args.data != "synthetic":
        return Path(args.data).expanduser()
    from fastft.data.synth import cached_synthetic
    return cached_synthetic(default_cache_dir(), n_train=args.synth_train, n_test=args.synth_test)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(batches_for_pass, passes: int, rt: Runtime) -> list[float]:
    """Images/s of each pass after the first; every batch lands where training wants it."""
    measured = []
    for p in range(passes):
        touched = torch.zeros((), device=rt.device)
        images, start = 0, time.perf_counter()
        for x, y in batches_for_pass(p):
            x = x.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
            # Read one element of every batch, so its copy has to finish, without a per-batch sync;
            # indexing is a view (reshape(-1) would copy a whole channels_last batch).
            touched += x[0, 0, 0, 0]
            images += y.shape[0]
        touched.item()
        sync(rt.device)
        if p:
            measured.append(images / (time.perf_counter() - start))
    return measured


def row(loader: str, split: str, setting: str, measured: list[float]) -> dict:
    return {"loader": loader, "split": split, "setting": setting, "images_per_s": statistics.mean(measured),
            "min": min(measured), "max": max(measured), "passes": len(measured)}


def torch_rows(layout, args, rt: Runtime) -> list[dict]:
    loaders = TorchLoaders(layout, args.image_size, args.batch_size, args.threads, seed=0,
                           pin_memory=rt.device.type == "cuda")
    setting = f"{args.threads} workers"
    return [row("torch", "train", setting, rates(loaders.train_batches, args.epochs, rt)),
            row("torch", "test", setting, rates(lambda p: loaders.test_batches(), args.epochs, rt))]


def dali_rows(layout, args, rt: Runtime) -> tuple[list[dict], list[str]]:
    from fastft.data.dali_cache import plan_cache
    from fastft.data.dali_loader import DaliLoaders, DaliOptions
    rows, notes = [], []
    # One plan for every loader here: a later plan, made with less free memory, could differ.
    cache = plan_cache(args.decode_cache, rt.device, [p for p, _ in layout.files["train"]],
                       [p for p, _ in layout.files["test"]])
    hw_loads = [float(v) for v in args.hw_decoder_load.split(",")] if rt.device.type == "cuda" else [0.65]
    for prefetch in (int(v) for v in args.prefetch.split(",")):
        for hw in hw_loads:
            options = DaliOptions(threads=args.threads, prefetch=prefetch, hw_decoder_load=hw)
            loaders = DaliLoaders(layout, args.image_size, args.batch_size, rt, seed=0,
                                  options=options, cache=cache)
            notes = loaders.describe()[1:]  # the first line restates the setting column
            setting = f"{args.threads} threads, prefetch {prefetch}" + \
                (f", hw load {hw}" if rt.device.type == "cuda" else "")
            rows.append(row("dali", "train", setting, rates(loaders.train_batches, args.epochs, rt)))
            rows.append(row("dali", "test", setting, rates(lambda p: loaders.test_batches(), args.epochs, rt)))
    return rows, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    rt = Runtime(device=device, amp_dtype=pick_amp(args.amp, device), compile=False, channels_last=True,
                 workers=args.threads)
    root = data_dir(args)
    layout = scan_dataset(root)
    rows = torch_rows(layout, args, rt)
    dali_results, notes = dali_rows(layout, args, rt)
    rows += dali_results
    header = [f"data {root}: {len(layout.files['train'])} train / {len(layout.files['test'])} test images, "
              f"image {args.image_size} px, batch {args.batch_size}",
              f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"{os.cpu_count()} cores, amp {rt.amp_name}, channels_last",
              f"images/s over {args.epochs - 1} measured passes after 1 warm-up pass (mean, min-max)",
              *notes]
    print("\n".join(header))
    print(f"{'loader':7} {'split':6} {'setting':38} {'images/s':>9}  min-max")
    for r in rows:
        print(f"{r['loader']:7} {r['split']:6} {r['setting']:38} {r['images_per_s']:9.1f}  "
              f"{r['min']:.1f}-{r['max']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
