"""Random-resized-crop + flip + normalise of already-decoded images: the fused kernel against the
torch reference, torchvision's resized_crop looped per image, and DALI, side by side in one run.

    python bench/kernels.py --device cpu --size 224 --batch 32            # this box
    python bench/kernels.py --device cuda --size 224 --batch 256 --json kernels.json

Every method makes the same batch: B crops of --sources random uint8 images of about 500 x 375 px
(the hotdog set's web sizes), boxes drawn by RandomResizedCrop's rule, half of them flipped,
ImageNet-normalised, (B, 3, S, S) channels_last in --dtype. DALI draws its own boxes with the same
rule (fn.random_resized_crop), so its work per image is the same in distribution, not identical.
Timing: --warmup untimed iterations, then --iters timed ones (CUDA events on CUDA,
perf_counter on CPU); reported as median and min-max images/s over the timed iterations.
GB/s counts bytes read (each crop's source pixels, once) plus bytes written (the output), next to
a plain device copy (clone of a uint8 buffer) measured in the same run.
On CPU the Triton kernel is not timed: Triton's interpreter is far too slow for a speed figure.
On CUDA the fast torch reference is not timed: it is the CPU path (uint8 antialiased interpolate),
and torch's CUDA antialias kernel takes float input only ("not implemented for 'Byte'").
Every method is timed on its own: one that raises becomes a row with its error and the others are
still timed; --json is rewritten after every row, so a run cut short keeps what it measured.
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
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as TF

# Runnable as `python bench/kernels.py` from the repository root: the root goes on sys.path (as
# `python -m` would put it); importing fastft first lets a bare checkout import fastft_kernels
# (fastft/tree_imports.py).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fastft  # noqa: E402,F401
import fastft_kernels as K  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=224, help="output side, px")
    p.add_argument("--batch", type=int, default=256, help="images per batch")
    p.add_argument("--sources", type=int, default=64, help="distinct decoded source images")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=10, help="timed iterations per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per method")
    p.add_argument("--threads", type=int, default=0, help="torch and DALI CPU threads (0: torch's default)")
    p.add_argument("--skip", default="", help="comma-separated methods to leave out, e.g. exact,dali")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def make_inputs(args):
    """Sources (list of uint8 HWC on the device), their packed buffer, and one batch's draws."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randint(300, 451, (args.sources,), generator=g).tolist()
    ws = torch.randint(400, 501, (args.sources,), generator=g).tolist()
    sources = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in zip(hs, ws)]
    packed = K.PackedImages.pack(sources, args.device)
    index = torch.randint(0, args.sources, (args.batch,), generator=g)
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(args.size)
    boxes = torch.tensor([rrc.get_params(torch.empty(3, hs[i], ws[i]), rrc.scale, rrc.ratio)
                          for i in index.tolist()], dtype=torch.float32)
    flip = torch.rand(args.batch, generator=g) < 0.5
    return sources, packed, index, boxes, flip


def timed(fn, args) -> list[float]:
    """Seconds per call of fn(), --iters of them after --warmup."""
    for _ in range(args.warmup):
        fn()
    seconds = []
    for _ in range(args.iters):
        if args.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
    return seconds


def torchvision_loop(sources, index, boxes, flip, size, dtype):
    """torchvision.transforms.v2.functional per image on uint8 CHW: resized_crop, flip, to float,
    normalise; then stacked, channels_last, in the output dtype."""
    out = []
    for i, (top, left, h, w), mirror in zip(index.tolist(), boxes.int().tolist(), flip.tolist()):
        x = TF.resized_crop(sources[i].permute(2, 0, 1), top, left, h, w, [size, size], antialias=True)
        x = TF.horizontal_flip(x) if mirror else x
        out.append(TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(MEAN), list(STD)))
    return torch.stack(out).to(dtype=dtype, memory_format=torch.channels_last)


def dali_runner(sources, args):
    """A callable running one batch through DALI's external_source -> random_resized_crop ->
    crop_mirror_normalize (HWC out) on already-decoded images, or None and the reason."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        return None, f"DALI does not import ({err.__class__.__name__}): pip install nvidia-dali-cuda120"
    on_gpu = args.device == "cuda"
    arrays = [s.numpy() for s in sources]
    order = torch.randint(0, len(arrays), (args.batch,), generator=torch.Generator().manual_seed(1)).tolist()
    dtype = {torch.float16: types.FLOAT16}.get(DTYPES[args.dtype], types.FLOAT)  # no bf16 in DALI

    @pipeline_def(batch_size=args.batch, num_threads=args.threads or os.cpu_count(), device_id=0 if on_gpu else None,
                  seed=0, prefetch_queue_depth=1)
    def pipe():
        images = fn.external_source(source=lambda: [arrays[i] for i in order], layout="HWC", batch=True)
        images = images.gpu() if on_gpu else images
        images = fn.random_resized_crop(images, size=[args.size, args.size], random_area=[0.08, 1.0],
                                        random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC",
                                        mirror=fn.random.coin_flip(probability=0.5),
                                        mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
    p = pipe()
    p.build()
    note = "fp32 out: DALI has no bf16" if DTYPES[args.dtype] == torch.bfloat16 else ""
    return (lambda: p.run()), note


def copy_rate(nbytes: int, args) -> float:
    """GB/s of a plain clone of an nbytes uint8 buffer on the device (read + write counted)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=args.device).fill_(7)
    seconds = timed(lambda: buf.clone(), args)
    return 2 * nbytes / statistics.median(seconds) / 1e9


def row(method: str, seconds: list[float], args, nbytes: int, note: str = "") -> dict:
    rates = [args.batch / s for s in seconds]
    return {"method": method, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "gb_per_s": nbytes / statistics.median(seconds) / 1e9, "note": note}


# Methods that run on one device type only, and why (printed and saved as notes).
DEVICE_ONLY = {"kernel": ("cuda", "not timed on CPU (Triton interpreter)"),
               "reference": ("cpu", "not timed on CUDA (the CPU path: torch's CUDA antialias takes no uint8)")}
ORDER = ("kernel", "reference", "exact", "torchvision", "dali")  # the kernel first: its figure matters most


def planned(device: str, skip: str) -> tuple[list[str], list[str]]:
    """(methods to time on `device`, in ORDER; notes for those left out by device or --skip)."""
    skipped = {s for s in skip.split(",") if s}
    names, notes = [], []
    for name in ORDER:
        only = DEVICE_ONLY.get(name)
        if only and only[0] != device:
            notes.append(f"{name}: {only[1]}")
        elif name in skipped:
            notes.append(f"{name}: skipped (--skip)")
        else:
            names.append(name)
    return names, notes


def methods(sources, packed, index, boxes, flip, args) -> tuple[dict, list[str]]:
    """(name -> maker, notes) for the methods `planned` keeps for --device and --skip; a maker
    returns (callable or None, note) and is called where its row is timed, so that one failing to
    build (DALI's pipeline) fails its own row."""
    dtype = DTYPES[args.dtype]
    dev = args.device
    index_d, boxes_d, flip_d = index.to(dev), boxes.to(dev), flip.to(dev)
    common = (packed, index_d, boxes_d, flip_d, args.size, MEAN, STD, dtype)
    dev_sources = [s.to(dev) for s in sources]
    makers = {
        "kernel": lambda: ((lambda: K.resized_crop_normalize_triton(*common)), "Triton, one launch per batch"),
        "reference": lambda: ((lambda: K.resized_crop_normalize_reference(*common, fast=True)),
                              "torch uint8 antialiased interpolate per sample (CPU path)"),
        "exact": lambda: ((lambda: K.resized_crop_normalize_reference(*common, fast=False)),
                          "torch float32 interpolate per sample (the kernel's test reference)"),
        "torchvision": lambda: ((lambda: torchvision_loop(dev_sources, index, boxes, flip, args.size, dtype)),
                                "v2.functional per image on uint8, then stack"),
        "dali": lambda: dali_runner(sources, args),
    }
    names, notes = planned(dev, args.skip)
    return {name: makers[name] for name in names}, notes


def error_row(method: str, exc: BaseException) -> dict:
    first_line = (str(exc).splitlines() or [""])[0]
    return {"method": method, "error": f"{type(exc).__name__}: {first_line}"[:300]}


def time_each(table: dict, args, nbytes: int, notes: list[str], save) -> list[dict]:
    """A row per method of `table` (name -> maker, see `methods`), each built and timed on its own:
    an exception becomes that row's error and the next is timed; a maker's None is a note. save(rows)
    after every method, so a run killed mid-way keeps the rows before."""
    rows = []
    for name, make in table.items():
        try:
            fn, note = make()
            if fn is None:
                notes.append(f"{name}: skipped, {note}")
            else:
                rows.append(row(name, timed(fn, args), args, nbytes, note))
        except Exception as exc:  # noqa: BLE001 - a bench row: report it and time the next
            rows.append(error_row(name, exc))
        save(rows)
    return rows


def print_rows(header: str, rows: list[dict], copy, nbytes: int, notes: list[str]) -> None:
    print(header)
    for r in rows:
        if "images_per_s" in r:
            print(f"  {r['method']:<12} {r['images_per_s']:>10.0f} img/s ({r['min']:.0f}-{r['max']:.0f})"
                  f"  {r['gb_per_s']:7.2f} GB/s  {r['note']}")
        else:
            print(f"  {r['method']:<12} FAILED: {r['error']}")
    if copy is not None:
        print(f"  {'device copy':<12} {copy:>10.2f} GB/s (clone of a {nbytes} B buffer, read + write)")
    for n in notes:
        print("  " + n)


def main(argv=None) -> int:
    """Exit 0 when every planned method was timed, 1 when one failed (its row says why)."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    sources, packed, index, boxes, flip = make_inputs(args)
    nbytes = args.batch * 3 * args.size ** 2 * DTYPES[args.dtype].itemsize  # written
    nbytes += int((boxes[:, 2] * boxes[:, 3]).sum()) * 3                    # read
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    table, notes = methods(sources, packed, index, boxes, flip, args)
    result = {"device": name, "args": vars(args), "bytes_per_batch": nbytes, "copy_gb_per_s": None,
              "rows": [], "notes": notes}

    def save(rows: list[dict]) -> None:
        result["rows"] = rows
        if args.json:
            write_json(result, Path(args.json))
    rows = time_each(table, args, nbytes, notes, save)
    try:
        result["copy_gb_per_s"] = copy_rate(nbytes, args)
    except Exception as exc:  # noqa: BLE001 - the rows above stand without it
        notes.append(f"device copy: failed, {error_row('copy', exc)['error']}")
    save(rows)
    print_rows(f"{name}: {args.size} px, batch {args.batch}, {args.dtype}, {args.sources} sources ~500x375, "
               f"{args.iters} timed iterations after {args.warmup} warm-up; median (min-max)",
               rows, result["copy_gb_per_s"], nbytes, notes)
    return 1 if any("error" in r for r in rows) else 0


def write_json(result: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


if __name__ == "__main__":
    sys.exit(main())
