"""Does DALI ever rewrite a batch that torch still holds? Checksum each batch on arrival and again
`--hold` batches later, with no host sync in between, and compare once at the end.

    python bench/dali_handoff.py --data DIR --device cuda --json handoff.json
    python bench/dali_handoff.py --data DIR --device cpu --image-size 32 --batch-size 4   # CPU operators

DALI's iterator docs warn that its outputs may be reused. fastft's DALI loader hands torch a
DLPack view of DALI's own buffer, so a reused buffer would silently change a batch under the
step that reads it. Here every batch (train epochs, then the test pass, as the engine asks for
them) is kept for `--hold` more batches, longer than DALI's prefetch queue (2 by default) plus
the batch in hand, and its checksum is taken again only then. On CUDA both checksums are queued
kernels, so DALI runs ahead exactly as in training; the values are read once at the end. A
reused buffer shows as a batch whose two checksums differ. `--amp off` (the default) checks
DALI's own fp32 buffers: with `--amp bf16` torch casts, so every batch is already a copy.

The loaders come from fastft.data.build_loaders with `--loader dali`, as the engine builds them.
Exit status: 0 when no batch changed, 1 when one did, 2 for a setting fastft rejects.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

# Run from a checkout without installing: fastft is the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastft.config import TrainConfig  # noqa: E402
from fastft.data import build_loaders, resolve_data_dir  # noqa: E402
from fastft.data.layout import scan_dataset  # noqa: E402
from fastft.errors import FastftError  # noqa: E402
from fastft.runtime import resolve_runtime  # noqa: E402


def checksum(x: torch.Tensor, y: torch.Tensor, weights: dict) -> torch.Tensor:
    """Position-weighted sums of a batch, shape (2,), float64, on x's device; no host sync.

    Weights sin(i) over the flattened index make a reordered or partly rewritten batch change
    the sum, which a plain sum would miss (a flipped image has the same plain sum). `weights`
    keeps one weight vector per (size, device) across calls.
    """
    def weighted(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1).to(torch.float64)  # reshape copies a channels_last view: a fresh read
        key = (flat.numel(), flat.device)
        if key not in weights:
            weights[key] = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).sin()
        return flat @ weights[key]
    return torch.stack([weighted(x), weighted(y).to(x.device)])


def handoff_check(batches: Iterable[tuple[str, torch.Tensor, torch.Tensor]], hold: int) -> dict:
    """Checksum each (name, x, y) on arrival and again after `hold` more batches arrived.

    Batches still held when the stream ends are checked again at the end. Returns counts and
    the names of the batches whose checksums differ; the only host sync is the final read.
    """
    held: deque = deque()
    names, arrival, later, weights = [], [], [], {}
    for name, x, y in batches:
        names.append(name)
        arrival.append(checksum(x, y, weights))
        held.append((x, y))
        if len(held) > hold:
            later.append(checksum(*held.popleft(), weights))
    later.extend(checksum(x, y, weights) for x, y in held)
    if not names:
        return {"batches": 0, "rewritten": 0, "rewritten_batches": [], "distinct_checksums": 0}
    first, second = torch.stack(arrival).cpu(), torch.stack(later).cpu()  # the one sync
    changed = (first != second).any(dim=1).tolist()
    return {"batches": len(names), "rewritten": sum(changed),
            "rewritten_batches": [n for n, c in zip(names, changed) if c],
            # a constant checksum would prove nothing: say how many batches it told apart
            "distinct_checksums": len({tuple(row) for row in first.tolist()})}


def named_batches(loaders, epochs: int):
    """The engine's order of passes: train epochs 0..epochs-1, then one test pass."""
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loaders.train_batches(epoch)):
            yield f"train{epoch}:{i}", x, y
    for i, (x, y) in enumerate(loaders.test_batches()):
        yield f"test:{i}", x, y


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder DIR, or 'synthetic'")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--image-size", type=int, default=224, help="px")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", default="off", choices=["auto", "bf16", "fp16", "off"],
                   help="off (default): torch receives DALI's own buffers")
    p.add_argument("--epochs", type=int, default=2, help="train passes before the test pass")
    p.add_argument("--hold", type=int, default=4, help="batches each batch is kept for (default: 4)")
    p.add_argument("--workers", type=int, default=-1, help="DALI CPU threads (default: the engine's)")
    p.add_argument("--decode-cache", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    cfg = TrainConfig(data=args.data, loader="dali", device=args.device, image_size=args.image_size,
                      batch_size=args.batch_size, amp=args.amp, workers=args.workers,
                      decode_cache=args.decode_cache)
    rt = resolve_runtime(cfg)
    loaders = build_loaders(cfg, scan_dataset(resolve_data_dir(cfg)), rt)
    result = handoff_check(named_batches(loaders, args.epochs), args.hold)
    return {"device": str(rt.device), "amp": rt.amp_name, "image_size": args.image_size,
            "batch_per_process": args.batch_size, "hold": args.hold, "epochs": args.epochs, **result}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except FastftError as exc:
        print(f"dali_handoff: error: {exc.one_line()}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    verdict = "no batch changed while held" if not result["rewritten"] else \
        f"{result['rewritten']} batch(es) CHANGED while held: {result['rewritten_batches'][:5]}"
    print(f"dali handoff: {result['batches']} batches, each held for {args.hold} more; {verdict}")
    return 1 if result["rewritten"] else 0


if __name__ == "__main__":
    sys.exit(main())
